#!/usr/bin/env bash
# Accept rate with metrics on vs off (issue 9: at most 5 % lower with metrics on). Runs
# scripts/bench.sh (without its 100 MB part) in rounds, alternating:
#   base: BASE_BIN, a build without the metrics (e.g. the commit before them), if given;
#   off:  this build, admin.http_address unset (the hooks still count);
#   on:   this build, admin.http_address set, /metrics and / scraped every 0.5 s.
#
#   ROUNDS=3 MSGS=20000 BASE_BIN=/var/tmp/mailbridge-base scripts/bench-metrics.sh
#
# Prints one line per run and the median accepted msg/s of each kind.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
export MSGS=${MSGS:-20000} SKIP_BIG=1
cargo build --release --locked --quiet
THIS=target/release/mailbridge
declare -A RESULTS
run() { # kind bin metrics
    local rate
    rate=$(BIN=$2 METRICS=$3 scripts/bench.sh | awk '/^accepted:/ {print $2}')
    echo "round $i $1: $rate msg/s"
    RESULTS[$1]="${RESULTS[$1]:-} $rate"
}
for i in $(seq "$ROUNDS"); do
    [ -n "${BASE_BIN:-}" ] && run base "$BASE_BIN" 0
    run off "$THIS" 0
    run on "$THIS" 1
done
for k in base off on; do
    [ -n "${RESULTS[$k]:-}" ] || continue
    echo "$k: median $(printf '%s\n' ${RESULTS[$k]} | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') msg/s (runs:${RESULTS[$k]})"
done
