#!/usr/bin/env bash
# Benchmark: `mailbridge serve` with an `exchange-online` upstream, against the fake Exchange
# Online server and token endpoint (examples/fake_exchange.rs: STARTTLS, XOAUTH2, the
# per-mailbox connection cap with `432 4.3.2`). Loopback only; bounded.
#
#   scripts/bench-exchange.sh                  # both runs below, defaults
#   CONNS=3 RATE=1200 scripts/bench-exchange.sh
#
# Run 1, relay rate with the limits lifted (messages_per_minute 1,000,000): MSGS messages of
# SIZE bytes over SESSIONS sessions with Postfix's smtp-source -d, once for each cap in CONNS
# (limits.connections, and the fake's --max-connections set to the same value). Prints
# accepted msg/s (until smtp-source got its last 250) and end-to-end msg/s (until the spool's
# queue/ holds no .msg any more, i.e. the fake answered 250 to every message).
#
# Run 2, a burst at the default pacing, scaled down: BURST messages with
# messages_per_minute = RATE and connections 3. The issue asks that 300 messages at the
# default 30/min take about 10 minutes; this run takes BURST * 60 / RATE seconds instead, and
# prints the measured time, the time it implies at 30/min (measured * RATE / 30) and the
# ideal at 30/min ((BURST - 1) * 2 s: the first message goes at once, then one every 2 s).
#
# Every run checks the fake's totals at SIGTERM (messages and recipients == sent,
# rejected_connections == 0 i.e. no 432, max_concurrent <= connections, every AUTH accepted)
# and that nothing ended in the spool's failed/; run 2 also checks that pacing held (not
# faster than (BURST - 1) * 60 / RATE). A failed check makes the script exit 1 after printing
# all figures. At the end of each run the script reads the relay's peak RSS (VmHWM) and the
# CPU time (user + sys) the relay and the fake used, and counts WARN/ERROR lines in the log.
#
# Other knobs: WORKERS (queue.workers, 8), TOKEN_LIFETIME (seconds, the fake's tokens; 3600;
# connections are renewed when their token reaches its renewal point, at least every half
# lifetime), TIMEOUT (seconds to wait for the queue to drain, 900), BENCH_DIR (/var/tmp: the
# spool is on the real disk, as in scripts/bench.sh). The full-scale burst of the issue is
# CONNS=3 RATE=30 scripts/bench-exchange.sh (run 2 then takes 10 minutes).
set -euo pipefail

MSGS=${MSGS:-2000}
SESSIONS=${SESSIONS:-10}
SIZE=${SIZE:-4096}
CONNS=${CONNS:-1 3 8}          # run 1: one pass per value of limits.connections
WORKERS=${WORKERS:-8}          # queue.workers
BURST=${BURST:-300}            # run 2: messages
RATE=${RATE:-600}              # run 2: limits.messages_per_minute (the default is 30)
TOKEN_LIFETIME=${TOKEN_LIFETIME:-3600}
TIMEOUT=${TIMEOUT:-900}        # seconds, per wait for the queue to drain
cd "$(dirname "$0")/.."

SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
[ -x "$SMTP_SOURCE" ] || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }

cargo build --release --locked --quiet --example fake_exchange --bin mailbridge
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/mailbridge
FAKE=$TARGET/release/examples/fake_exchange

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/mailbridge-bench-exchange.XXXXXX")
PID=
FAKE_PID=
cleanup() {
    local p
    for p in $PID $FAKE_PID; do
        if kill "$p" 2>/dev/null; then wait "$p" 2>/dev/null || true; fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk -v k="$2" '$1==k":" {print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)
cpu_s() { awk -v t="$CLK_TCK" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }  # user+sys
now() { date +%s.%N; }
calc() { python3 -c "print(f'{$1:$2}')"; }        # calc EXPR FORMAT
json() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

FAILED=0
check() { # check DESCRIPTION CONDITION...
    local what=$1; shift
    if "$@"; then echo "  ok:   $what"; else echo "  FAIL: $what"; FAILED=1; fi
}

start_fake() { # $1 = --max-connections
    rm -rf "$WORK/fake"; mkdir -p "$WORK/fake"
    "$FAKE" --no-stdin --token-lifetime "$TOKEN_LIFETIME" --max-connections "$1" \
        --dir "$WORK/fake" > "$WORK/fake.out" 2> "$WORK/fake.err" &
    FAKE_PID=$!
    for _ in $(seq 100); do
        [ -s "$WORK/fake.out" ] && break
        sleep 0.1
    done
    FAKE_INFO=$(head -n 1 "$WORK/fake.out")
    [ -n "$FAKE_INFO" ] || { echo "fake_exchange did not start:" >&2; cat "$WORK/fake.err" >&2; exit 1; }
}

stop_fake() { # leaves the totals (the second JSON line) in FAKE_TOTALS
    kill -TERM "$FAKE_PID"; wait "$FAKE_PID" || true; FAKE_PID=
    FAKE_TOTALS=$(sed -n 2p "$WORK/fake.out")
    [ -n "$FAKE_TOTALS" ] || { echo "fake_exchange printed no totals:" >&2; cat "$WORK/fake.err" >&2; exit 1; }
}

start_relay() { # $1 = limits.connections, $2 = limits.messages_per_minute
    PORT=$(free_port)
    local smtp=${FAKE_INFO#*\"smtp\":\"}; smtp=${smtp%%\"*}
    rm -rf "$WORK/spool" "$WORK/state"; mkdir -p "$WORK/state"
    printf 'bench-secret\n' > "$WORK/secret"; chmod 600 "$WORK/secret"
    cat > "$WORK/relay.yaml" <<YAML
hostname: bench.test
state_dir: $WORK/state
listeners:
  - address: "127.0.0.1:$PORT"
limits:
  max_connections_per_ip: 64
spool:
  path: $WORK/spool
log:
  level: warn
  format: json
queue:
  retry: [5s]
  workers: $WORKERS
upstreams:
  - name: bench
    type: exchange-online
    mailbox: $(json "$FAKE_INFO" mailbox)
    tenant_id: contoso.com
    client_id: 11111111-1111-1111-1111-111111111111
    client_secret_file: $WORK/secret
    host: localhost
    port: ${smtp##*:}
    token_url: $(json "$FAKE_INFO" token_url)
    ca_file: $(json "$FAKE_INFO" ca_file)
    limits:
      connections: $1
      messages_per_minute: $2
      recipients_per_day: 100000000
YAML
    "$BIN" serve -c "$WORK/relay.yaml" > "$WORK/relay.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "relay did not start:" >&2; cat "$WORK/relay.log" >&2; exit 1
}

stop_relay() { kill "$PID"; wait "$PID" || true; PID=; }

count_dir() { find "$WORK/spool/$1" -maxdepth 1 -name '*.msg' | wc -l; }

wait_drained() { # until queue/ holds no message; sets T_DONE
    local deadline=$(( $(date +%s) + TIMEOUT ))
    while [ "$(count_dir queue)" -gt 0 ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "timeout: $(count_dir queue) still queued" >&2; tail -n 20 "$WORK/relay.log" >&2; exit 1; }
        sleep 0.05
    done
    T_DONE=$(now)
}

# Stops both processes and checks the fake's totals; $1 = messages sent, $2 = connection cap.
finish_run() {
    PEAK_RSS=$(rss_kb "$PID" VmHWM)
    RELAY_CPU=$(cpu_s "$PID"); FAKE_CPU=$(cpu_s "$FAKE_PID")
    stop_relay
    stop_fake
    local t=$FAKE_TOTALS
    MESSAGES=$(json "$t" messages); CONNECTIONS=$(json "$t" connections)
    MAX_CONC=$(json "$t" max_concurrent); REJECTED=$(json "$t" rejected_connections)
    TOKENS=$(json "$t" token_requests); AUTHS=$(json "$t" auths)
    AUTHS_OK=$(json "$t" auths_accepted); RCPTS=$(json "$t" recipients)
    FAILED_MSGS=$(count_dir failed)
    WARNINGS=$(grep -c '"level":"\(WARN\|ERROR\)"' "$WORK/relay.log" || true)
    echo "  fake: $t"
    echo "  relay log: $WARNINGS warnings/errors, peak RSS $((PEAK_RSS / 1024)) MB ($PEAK_RSS kB)"
    echo "  CPU (user+sys, whole run): relay $RELAY_CPU s, fake $FAKE_CPU s"
    check "messages received == $1 (got $MESSAGES)" [ "$MESSAGES" -eq "$1" ]
    check "recipients received == $1 (got $RCPTS)" [ "$RCPTS" -eq "$1" ]
    check "no 432 (rejected_connections $REJECTED)" [ "$REJECTED" -eq 0 ]
    check "max_concurrent $MAX_CONC <= connections $2" [ "$MAX_CONC" -le "$2" ]
    check "every AUTH accepted ($AUTHS_OK of $AUTHS)" [ "$AUTHS_OK" -eq "$AUTHS" ]
    check "nothing in failed/ ($FAILED_MSGS)" [ "$FAILED_MSGS" -eq 0 ]
    if [ "$WARNINGS" -gt 0 ]; then grep '"level":"\(WARN\|ERROR\)"' "$WORK/relay.log" | head -n 5 | sed 's/^/  log: /'; fi
}

SUMMARY=()

# --- run 1: relay rate, limits lifted --------------------------------------------------------
for c in $CONNS; do
    echo "== run 1: $MSGS x $SIZE bytes, $SESSIONS sessions, connections $c, messages_per_minute 1000000, workers $WORKERS"
    start_fake "$c"
    start_relay "$c" 1000000
    sleep 1
    T0=$(now)
    "$SMTP_SOURCE" -d -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -f bench@example.com -t sink@example.com "127.0.0.1:$PORT"
    T1=$(now)
    wait_drained
    ACCEPTED=$(calc "$MSGS/($T1-$T0)" .0f)
    E2E=$(calc "$MSGS/($T_DONE-$T0)" .0f)
    echo "  accepted:   $ACCEPTED msg/s ($(calc "$T1-$T0" .2f) s)"
    echo "  end-to-end: $E2E msg/s ($(calc "$T_DONE-$T0" .2f) s)"
    finish_run "$MSGS" "$c"
    SUMMARY+=("$(printf 'run 1, connections %-2s accepted %5s msg/s  end-to-end %5s msg/s  upstream connections %s, max concurrent %s, token requests %s, AUTHs %s, peak RSS %s kB, CPU relay %s s fake %s s' \
        "$c" "$ACCEPTED" "$E2E" "$CONNECTIONS" "$MAX_CONC" "$TOKENS" "$AUTHS" "$PEAK_RSS" "$RELAY_CPU" "$FAKE_CPU")")
done

# --- run 2: burst at a scaled-down default rate ----------------------------------------------
echo "== run 2: burst of $BURST x $SIZE bytes, $SESSIONS sessions, connections 3, messages_per_minute $RATE, workers $WORKERS"
start_fake 3
start_relay 3 "$RATE"
sleep 1
T0=$(now)
"$SMTP_SOURCE" -d -s "$SESSIONS" -m "$BURST" -l "$SIZE" -f bench@example.com -t sink@example.com "127.0.0.1:$PORT"
T1=$(now)
wait_drained
TOOK=$(calc "$T_DONE-$T0" .2f)
IDEAL=$(calc "($BURST-1)*60/$RATE" .2f)
IMPLIED=$(calc "($T_DONE-$T0)*$RATE/30" .0f)
IDEAL30=$(( (BURST - 1) * 2 ))
echo "  accepted in $(calc "$T1-$T0" .2f) s; first accepted -> last delivered: $TOOK s (ideal at $RATE/min: $IDEAL s)"
echo "  implied at 30/min: $IMPLIED s = $(calc "$IMPLIED/60" .1f) min (ideal $IDEAL30 s; the issue: $BURST/30 = $(calc "$BURST/30" .1f) min)"
finish_run "$BURST" 3
check "pacing held: $TOOK s >= $IDEAL s" python3 -c "import sys; sys.exit(not ($TOOK >= $IDEAL * 0.99))"
SUMMARY+=("$(printf 'run 2, %s at %s/min: %s s (ideal %s s) -> %s s at 30/min (ideal %s s), upstream connections %s, max concurrent %s, peak RSS %s kB, CPU relay %s s' \
    "$BURST" "$RATE" "$TOOK" "$IDEAL" "$IMPLIED" "$IDEAL30" "$CONNECTIONS" "$MAX_CONC" "$PEAK_RSS" "$RELAY_CPU")")

echo
echo "spool: $WORK ($(stat -f -c %T "$WORK")), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then echo "some checks FAILED" >&2; exit 1; fi
echo "all checks passed"
