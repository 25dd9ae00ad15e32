#!/usr/bin/env bash
# CPU per forwarded frame, proxy against the bare relay, robust to a shared machine's noise:
# PAIRS runs of each at the same load, alternating proxy and relay so that a burst of outside
# load hits both alike, then the median of each and their ratio.
#   bench/cpu.sh CALLS FANOUT DURATION PAIRS      e.g. bench/cpu.sh 500 2 20s 5
# Prints each run's figure, then one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-500}
fanout=${2:-2}
duration=${3:-20s}
pairs=${4:-5}

figures=()
for i in $(seq "$pairs"); do
  for target in proxy relay; do
    line=$(TARGETS=$target bench/run.sh "$calls" "$fanout" "$duration" 5s 2>/dev/null | grep "^$target ")
    cpu=$(echo "${line#* }" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(round(r["proxy_cpu_ms_per_1000_frames"] or 0, 2), r["frames_lost"], r["latency"]["p99_ms"])')
    echo "$target run=$i calls=$calls fanout=$fanout cpu_ms_per_1000_frames,lost,p99_ms= $cpu"
    figures+=("$target ${cpu%% *}")
  done
done
printf '%s\n' "${figures[@]}" | python3 -c '
import statistics, sys
runs = {}
for line in sys.stdin:
    target, value = line.split()
    runs.setdefault(target, []).append(float(value))
p, r = statistics.median(runs["proxy"]), statistics.median(runs["relay"])
print(f"median CPU per 1000 frames: proxy {p:.2f} ms, relay {r:.2f} ms, ratio {p / r:.2f}")'
