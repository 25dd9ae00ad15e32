#!/usr/bin/env bash
# The knee: the most calls held with zero loss and p99 added latency <= 20 ms, per fan-out,
# for the proxy and for the bare relay, measured in the same session.
#   bench/knee.sh "1 2 4" START STEP MAX DURATION RAMP
# Walks the call count up from START by STEP until a point fails (or MAX). A failing point is
# run once more before it counts: the shared machine has bursts of outside load that wreck a
# single run's tail. Prints one line per run: target fanout calls verdict held loss p50_ms
# p99_ms cpu_ms_per_1000_frames rss_kib_per_call loadgen_cpu_percent.
set -euo pipefail
cd "$(dirname "$0")/.."
fanouts=${1:-"1 2 4"}
start=${2:-200}
step=${3:-100}
max=${4:-1500}
duration=${5:-30s}
ramp=${6:-10s}

for fanout in $fanouts; do
  for target in proxy relay; do
    calls=$start
    while [ "$calls" -le "$max" ]; do
      for attempt in 1 2; do
        line=$(TARGETS=$target bench/run.sh "$calls" "$fanout" "$duration" "$ramp" 2>/dev/null | grep "^$target ")
        verdict=$(echo "${line#* }" | python3 -c '
import json, sys
r = json.load(sys.stdin)
l = r["latency"]
ok = r["frames_lost"] == 0 and r["calls_held"] == r["calls"] and l["p99_ms"] <= 20
print(("ok" if ok else "over"), r["calls_held"], r["frames_lost"], l["p50_ms"], l["p99_ms"],
      round(r["proxy_cpu_ms_per_1000_frames"] or 0, 2), round(r["proxy_rss_kib_per_call"] or 0, 1),
      round(r["loadgen_cpu_percent"], 1))')
        echo "$target fanout=$fanout calls=$calls $verdict"
        case $verdict in ok*) break ;; esac
      done
      case $verdict in ok*) ;; *) break ;; esac
      calls=$((calls + step))
    done
  done
done
