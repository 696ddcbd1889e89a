#!/usr/bin/env bash
# Benchmark: push messages with Postfix's smtp-source into `mailbridge serve` with an outbox
# upstream, then measure a 100 MB message's effect on memory. Loopback only; bounded.
#
#   scripts/bench.sh                 # 20,000 messages of 4 KB over 10 sessions
#   MSGS=2000 scripts/bench.sh       # a quicker run
#   METRICS=1 scripts/bench.sh       # with admin.http_address on, /metrics and the status
#                                    # page scraped every 0.5 s during the run
#                                    # (SCRAPE_EVERY=5 for every 5 s)
#   BIN=path/to/mailbridge SKIP_BIG=1 scripts/bench.sh   # a given binary, no 100 MB part
#
# Prints: accepted msg/s (until smtp-source got its last 250), end-to-end msg/s (until the
# last .eml appeared in the outbox), idle RSS, peak RSS, and the peak RSS growth caused by one
# 100 MB message. Full durability: the spool lives on the real disk (not tmpfs) under
# ${BENCH_DIR:-/var/tmp}.
#
# The outbox (the sink standing in for the upstream) goes to ${OUTBOX_BASE:-/dev/shm}, so the
# sink's own file creation does not compete with the spool for the disk, as a network
# upstream would not. OUTBOX_BASE=/var/tmp puts it on the disk too. On ext4 without a journal
# (this machine's root file system), creating files right after thousands were deleted is
# slow for about 6 minutes (ext4 skips recently deleted inodes); a run soon after deleting
# many files on the same file system measures that, not mailbridge.
set -euo pipefail

MSGS=${MSGS:-20000}
SESSIONS=${SESSIONS:-10}
SIZE=${SIZE:-4096}
BIG_MB=${BIG_MB:-100}
cd "$(dirname "$0")/.."

SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
[ -x "$SMTP_SOURCE" ] || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }

METRICS=${METRICS:-0}
SKIP_BIG=${SKIP_BIG:-0}
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked --quiet
    BIN=target/release/mailbridge
fi

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailbridge-bench.XXXXXX")
OUTBOX_BASE=${OUTBOX_BASE:-/dev/shm}
[ -d "$OUTBOX_BASE" ] || OUTBOX_BASE=$WORK
OUTBOX=$(mktemp -d "$OUTBOX_BASE/mailbridge-bench-outbox.XXXXXX")
PID=
SCRAPER=
cleanup() {
    [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null && wait "$SCRAPER" 2>/dev/null || true
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK" "$OUTBOX"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk -v k="$2" '$1==k":" {print $2}' "/proc/$1/status"; }
now() { date +%s.%N; }
# User + system CPU seconds of a process so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

start_daemon() { # $1 = max_message_size
    PORT=$(free_port)
    HTTP_PORT=$(free_port)
    rm -rf "$WORK/spool" "$OUTBOX"; mkdir -p "$OUTBOX"
    ADMIN="admin:
  socket: $WORK/admin.sock"
    # NO_ADMIN=1: for a build from before the admin section existed (bench-metrics.sh's base).
    if [ "${NO_ADMIN:-0}" = 1 ]; then
        ADMIN=""
    elif [ "$METRICS" = 1 ]; then
        ADMIN="$ADMIN
  http_address: 127.0.0.1:$HTTP_PORT"
    fi
    cat > "$WORK/relay.yaml" <<YAML
listeners:
  - address: "127.0.0.1:$PORT"
access:
  allow_networks: ["127.0.0.0/8"]
limits:
  max_message_size: $1
  max_connections_per_ip: 64
spool:
  path: $WORK/spool
upstreams:
  - name: bench
    type: outbox
    path: $OUTBOX
log:
  level: warn
$ADMIN
YAML
    "$BIN" serve -c "$WORK/relay.yaml" > "$WORK/daemon.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
        sleep 0.1
    done
    echo "daemon did not start:" >&2; cat "$WORK/daemon.log" >&2; exit 1
}

stop_daemon() { kill "$PID"; wait "$PID" || true; PID=; }

count_outbox() { find "$OUTBOX" -maxdepth 1 -name '*.eml' | wc -l; }

# --- throughput -----------------------------------------------------------------------
start_daemon 35MiB
sleep 1
IDLE_RSS=$(rss_kb "$PID" VmRSS)
if [ "$METRICS" = 1 ]; then
    # What a Prometheus server and an open status page tab do, much more often.
    (while :; do
        curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/metrics"
        curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/"
        sleep "${SCRAPE_EVERY:-0.5}"
    done) &
    SCRAPER=$!
fi
T0=$(now)
"$SMTP_SOURCE" -d -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -f bench@example.com -t sink@example.com "127.0.0.1:$PORT"
T1=$(now)
DEADLINE=$(( $(date +%s) + 600 ))
while [ "$(count_outbox)" -lt "$MSGS" ]; do
    [ "$(date +%s)" -lt "$DEADLINE" ] || { echo "timeout: only $(count_outbox) delivered" >&2; exit 1; }
    sleep 0.05
done
T2=$(now)
PEAK_RSS=$(rss_kb "$PID" VmHWM)
CPU=$(cpu_s "$PID")
CPU_US=$(python3 -c "print(f'{$CPU * 1e6 / $MSGS:.0f}')")
if [ -n "$SCRAPER" ]; then
    kill "$SCRAPER"; wait "$SCRAPER" 2>/dev/null || true; SCRAPER=
    curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E '^mailbridge_(messages_accepted_total|sessions_total) '
fi
ACCEPTED=$(python3 -c "print(f'{$MSGS/($T1-$T0):.0f}')")
E2E=$(python3 -c "print(f'{$MSGS/($T2-$T0):.0f}')")
stop_daemon

if [ "$SKIP_BIG" = 1 ]; then
    echo
    echo "messages: $MSGS x $SIZE bytes over $SESSIONS sessions (smtp-source -d), metrics: $METRICS"
    echo "accepted:      $ACCEPTED msg/s"
    echo "end-to-end:    $E2E msg/s"
    echo "relay CPU:     $CPU s ($CPU_US us/msg, user+sys, start to last delivery)"
    echo "idle RSS:      $((IDLE_RSS / 1024)) MB ($IDLE_RSS kB)"
    echo "peak RSS:      $((PEAK_RSS / 1024)) MB ($PEAK_RSS kB)"
    exit 0
fi

# --- one large message ------------------------------------------------------------------
start_daemon 200MiB
python3 - "$PORT" <<'PY'
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1])); s.sendmail("a@example.com", ["b@example.com"], b"Subject: warm-up\r\n\r\nx\r\n"); s.quit()
PY
sleep 1
BEFORE=$(rss_kb "$PID" VmHWM)
python3 - "$PORT" "$BIG_MB" <<'PY'
import smtplib, sys
line = b"x" * 76 + b"\r\n"
body = b"Subject: big\r\n\r\n" + line * (int(sys.argv[2]) * 1024 * 1024 // len(line))
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1])); s.sendmail("a@example.com", ["b@example.com"], body); s.quit()
PY
DEADLINE=$(( $(date +%s) + 300 ))
while [ "$(count_outbox)" -lt 2 ]; do
    [ "$(date +%s)" -lt "$DEADLINE" ] || { echo "timeout waiting for the big message" >&2; exit 1; }
    sleep 0.1
done
AFTER=$(rss_kb "$PID" VmHWM)
stop_daemon

echo
echo "messages: $MSGS x $SIZE bytes over $SESSIONS sessions (smtp-source -d), metrics: $METRICS"
echo "spool: $WORK ($(stat -f -c %T "$WORK")), outbox: $OUTBOX ($(stat -f -c %T "$OUTBOX"))"
echo "accepted:      $ACCEPTED msg/s"
echo "end-to-end:    $E2E msg/s"
echo "relay CPU:     $CPU s ($CPU_US us/msg, user+sys, start to last delivery)"
echo "idle RSS:      $((IDLE_RSS / 1024)) MB ($IDLE_RSS kB)"
echo "peak RSS:      $((PEAK_RSS / 1024)) MB ($PEAK_RSS kB)"
echo "${BIG_MB} MB message: peak RSS $BEFORE kB -> $AFTER kB (+$(( (AFTER - BEFORE) / 1024 )) MB)"
