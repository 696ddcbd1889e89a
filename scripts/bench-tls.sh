#!/usr/bin/env bash
# Benchmark: the accept rate over TLS. MSGS messages, each on a new connection with a full
# STARTTLS handshake (EHLO, STARTTLS, EHLO, MAIL, RCPT, DATA, QUIT), from SESSIONS client
# processes in parallel (Python smtplib; smtp-source cannot do TLS), into `mailbridge serve`
# with an outbox upstream. Loopback only; bounded.
#
#   scripts/bench-tls.sh                          # 2,000 messages, 8 sessions, RSA 2048 cert
#   KEY=ecdsa scripts/bench-tls.sh                # ECDSA P-256 certificate instead
#   TLS_ARGS=tls1.2 scripts/bench-tls.sh          # clients limited to TLS 1.2
#   BIN=/path/to/other/mailbridge scripts/bench-tls.sh   # another build (e.g. before/after)
#
# Both builds get the same certificate (made here with openssl), so a comparison measures the
# TLS stack, not the key type. Prints messages/s and handshakes/s until the last 250.
set -euo pipefail

MSGS=${MSGS:-2000}
SESSIONS=${SESSIONS:-8}
KEY=${KEY:-rsa}
TLS_ARGS=${TLS_ARGS:-}
cd "$(dirname "$0")/.."

if [ -z "${BIN:-}" ]; then
    cargo build --release --locked --quiet
    BIN=target/release/mailbridge
fi

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailbridge-bench-tls.XXXXXX")
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

case "$KEY" in
    rsa) newkey=(-newkey rsa:2048) ;;
    ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    *) echo "KEY must be rsa or ecdsa" >&2; exit 1 ;;
esac
openssl req -x509 "${newkey[@]}" -nodes -subj /CN=localhost -days 2 \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 600 "$WORK/key.pem"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/relay.yaml" <<YAML
state_dir: $WORK/state
listeners:
  - address: "127.0.0.1:$PORT"
    tls: starttls
tls:
  cert_file: $WORK/cert.pem
  key_file: $WORK/key.pem
access:
  allow_networks: ["127.0.0.0/8"]
limits:
  max_connections_per_ip: 64
spool:
  path: $WORK/spool
upstreams:
  - name: bench
    type: outbox
    path: $WORK/outbox
log:
  level: warn
YAML
"$BIN" serve -c "$WORK/relay.yaml" > "$WORK/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    sleep 0.1
done

python3 - "$PORT" "$MSGS" "$SESSIONS" "$WORK/cert.pem" "$TLS_ARGS" <<'PY'
import multiprocessing, smtplib, ssl, sys, time

port, msgs, sessions, cafile, tls_args = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
body = b"From: bench@lan.example\r\nTo: b@ext.example\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 52

def worker(n):
    ctx = ssl.create_default_context(cafile=cafile)
    if tls_args == "tls1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    versions = {}
    for _ in range(n):
        s = smtplib.SMTP("localhost", port, timeout=60)
        s.starttls(context=ctx)
        versions[s.sock.version() + " " + s.sock.cipher()[0]] = 1
        s.sendmail("bench@lan.example", ["b@ext.example"], body)
        s.quit()
    return list(versions)

per = [msgs // sessions + (1 if i < msgs % sessions else 0) for i in range(sessions)]
start = time.monotonic()
with multiprocessing.Pool(sessions) as pool:
    seen = pool.map(worker, per)
elapsed = time.monotonic() - start
print(f"negotiated: {sorted(set(v for w in seen for v in w))}")
print(f"{msgs} messages over STARTTLS, {sessions} sessions: {elapsed:.2f} s, {msgs / elapsed:.0f} msg/s (one handshake each)")
PY

# The daemon's own CPU time (user + system), since the clients share the machine's cores:
# the cost per message of the server's TLS stack, independent of the client's speed.
read -r -a stat < "/proc/$PID/stat"
ticks=$(getconf CLK_TCK)
python3 -c "import sys; u,s,t,n=map(int,sys.argv[1:]); cpu=(u+s)/t; print(f'daemon CPU: {cpu:.2f} s ({cpu*1000/n:.2f} ms per message)')" \
    "${stat[13]}" "${stat[14]}" "$ticks" "$MSGS"
