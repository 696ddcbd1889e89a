#!/usr/bin/env bash
# Makes docs/status-page.png: starts a demo-like `mailbridge serve` on loopback with two
# upstreams, sends some mail through it, lets one upstream pause, and screenshots the status
# page (admin.http_address) with headless Chromium.
#
#   scripts/status-page.sh                  # writes docs/status-page.png
#   OUT=/tmp/page.png scripts/status-page.sh
#
# The upstreams:
# - "local": an outbox (mail from *@fabrikam.example is routed there and delivered);
# - "contoso": Exchange Online whose token endpoint (a few lines of Python here) refuses the
#   client secret with AADSTS7000215, so the upstream pauses and its mail stays queued.
# Needs: cargo, python3, chromium (Debian's package). Nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-docs/status-page.png}
WIDTH=${WIDTH:-1280}
HEIGHT=${HEIGHT:-1690}
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROMIUM" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 1; }

cargo build --locked --quiet --bin mailbridge
BIN=${MAILBRIDGE_BIN:-target/debug/mailbridge}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailbridge-page.XXXXXX")
PID=
TOKEN_PID=
cleanup() {
    for p in $PID $TOKEN_PID; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SMTP_PORT=$(free_port)
HTTP_PORT=$(free_port)
TOKEN_PORT=$(free_port)
DEAD_PORT=$(free_port)

# The token endpoint: every request gets Entra's answer to a wrong client secret.
python3 - "$TOKEN_PORT" > "$WORK/token.log" 2>&1 <<'PY' &
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            "error_codes": [7000215],
        }).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
TOKEN_PID=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$TOKEN_PORT") 2>/dev/null && break
    sleep 0.1
done

umask 077
echo "not-the-real-secret" > "$WORK/client.secret"
cat > "$WORK/relay.yaml" <<YAML
hostname: relay.contoso.example
state_dir: $WORK/state
listeners:
  - address: "127.0.0.1:$SMTP_PORT"
    tls: starttls
access:
  allow_networks: ["127.0.0.0/8"]
spool:
  path: $WORK/spool
upstreams:
  - name: contoso
    type: exchange-online
    mailbox: relay@contoso.example
    tenant_id: contoso.example
    client_id: 11111111-1111-1111-1111-111111111111
    client_secret_file: $WORK/client.secret
    host: 127.0.0.1
    port: $DEAD_PORT
    token_url: "http://127.0.0.1:$TOKEN_PORT/contoso/oauth2/v2.0/token"
  - name: local
    type: outbox
    path: $WORK/outbox
routes:
  - sender: "*@fabrikam.example"
    upstream: local
queue:
  retry: [1m, 5m]
  postmaster: postmaster@contoso.example
admin:
  socket: $WORK/admin.sock
  http_address: "127.0.0.1:$HTTP_PORT"
log:
  level: warn
YAML

"$BIN" serve -c "$WORK/relay.yaml" > "$WORK/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null && break
    sleep 0.1
done

# Traffic: scans routed to the outbox, printer mail for the paused upstream, one refusal.
python3 - "$SMTP_PORT" <<'PY'
import smtplib, sys
port = int(sys.argv[1])
def send(helo, sender, rcpts, subject, tls=False):
    s = smtplib.SMTP("127.0.0.1", port, local_hostname=helo)
    if tls:
        s.starttls()  # the listener's self-signed certificate: not verified here
    s.sendmail(sender, rcpts, f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nscan attached\r\n".encode())
    s.quit()
for i in range(3):
    send("scanner-3rd-floor", "scanner@fabrikam.example", [f"user{i}@fabrikam.example"], f"Scan {i}", tls=True)
send("mfp-reception", "printer@contoso.example", ["accounts@contoso.example", "ap@contoso.example"], "Invoice run")
send("erp01", "erp@contoso.example", ["orders@contoso.example"], "Order confirmation 10442")
try:
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="unknown-device")
    s.ehlo()
    s.mail("someone@example.net", ["SIZE=999999999999"])
except smtplib.SMTPException:
    pass
PY

# Wait until contoso is paused and the outbox got its mail.
for _ in $(seq 300); do
    if curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" | grep -q '^mailbridge_upstream_paused{upstream="contoso"} 1'; then
        break
    fi
    sleep 0.1
done
sleep 1

mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --hide-scrollbars --user-data-dir="$WORK/chromium" --window-size="$WIDTH,$HEIGHT" \
    --screenshot="$OUT" "http://127.0.0.1:$HTTP_PORT/" 2> "$WORK/chromium.log" ||
    { cat "$WORK/chromium.log" >&2; exit 1; }
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)"
