#!/usr/bin/env bash
# Accept rate with metrics on vs off (issue 9: at most 5 % lower with metrics on). Runs
# scripts/bench.sh (without its 100 MB part) in rounds, alternating:
#   base: BASE_BIN, a build without the metrics (e.g. main before them), if given;
#   off:  this build, admin.http_address unset (the data-path hooks still count);
#   on:   this build, admin.http_address set, /metrics and / scraped every 0.5 s.
#
#   ROUNDS=6 MSGS=20000 BASE_BIN=/var/tmp/mailbridge-base scripts/bench-metrics.sh
#
# Prints one line per run (accepted msg/s, relay CPU per message) and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
export MSGS=${MSGS:-20000} SKIP_BIG=1
cargo build --release --locked --quiet
THIS=target/release/mailbridge
declare -A RATES CPUS
run() { # kind bin metrics [no_admin]
    local out rate cpu
    out=$(BIN=$2 METRICS=$3 NO_ADMIN=${4:-0} scripts/bench.sh)
    rate=$(awk '/^accepted:/ {print $2}' <<<"$out")
    cpu=$(awk '/^relay CPU:/ {gsub(/\(/, "", $5); print $5}' <<<"$out")
    echo "round $i $1: $rate msg/s, $cpu us/msg"
    RATES[$1]="${RATES[$1]:-} $rate"
    CPUS[$1]="${CPUS[$1]:-} $cpu"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
for i in $(seq "$ROUNDS"); do
    # BASE_BIN may predate the `admin:` section (BASE_NO_ADMIN=1 leaves it out).
    [ -n "${BASE_BIN:-}" ] && run base "$BASE_BIN" 0 "${BASE_NO_ADMIN:-0}"
    run off "$THIS" 0
    run on "$THIS" 1
done
for k in base off on; do
    [ -n "${RATES[$k]:-}" ] || continue
    # shellcheck disable=SC2086
    echo "$k: median $(median ${RATES[$k]}) msg/s (runs:${RATES[$k]}), median $(median ${CPUS[$k]}) us/msg CPU (runs:${CPUS[$k]})"
done
