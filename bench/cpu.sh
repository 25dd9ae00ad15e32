#!/usr/bin/env bash
# The proxy against the bare relay, robust to a shared machine's noise: PAIRS runs of each at
# the same load, alternating proxy and relay so that a burst of outside load hits both alike,
# then the median of each figure and the proxy's as a multiple of the relay's — the ratios
# are what SPEC section 9 sets (CPU per forwarded frame, p99 added latency).
#   bench/cpu.sh CALLS FANOUT DURATION PAIRS      e.g. bench/cpu.sh 500 2 20s 5
# Prints each run's figures, then one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-500}
fanout=${2:-2}
duration=${3:-20s}
pairs=${4:-5}

runs=()
for i in $(seq "$pairs"); do
  for target in proxy relay; do
    line=$(TARGETS=$target bench/run.sh "$calls" "$fanout" "$duration" 5s 2>/dev/null | grep "^$target ")
    figures=$(echo "${line#* }" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(round(r["proxy_cpu_ms_per_1000_frames"] or 0, 2), r["latency"]["p50_ms"],
      r["latency"]["p99_ms"], r["frames_lost"])')
    echo "$target run=$i calls=$calls fanout=$fanout cpu_ms_per_1000_frames,p50_ms,p99_ms,lost= $figures"
    runs+=("$target $figures")
  done
done
printf '%s\n' "${runs[@]}" | python3 -c '
import statistics, sys
runs = {}
for line in sys.stdin:
    target, cpu, p50, p99, lost = line.split()
    runs.setdefault(target, []).append((float(cpu), float(p50), float(p99), int(lost)))
def median(target, i):
    return statistics.median(r[i] for r in runs[target])
cpu = median("proxy", 0), median("relay", 0)
p99 = median("proxy", 2), median("relay", 2)
lost = sum(r[3] for r in runs["proxy"]), sum(r[3] for r in runs["relay"])
pairs = len(runs["proxy"])
print(f"medians of {pairs} pairs: CPU per 1000 frames proxy {cpu[0]:.2f} ms, "
      f"relay {cpu[1]:.2f} ms, ratio {cpu[0] / cpu[1]:.2f}; p99 proxy {p99[0]:.2f} ms, "
      f"relay {p99[1]:.2f} ms, ratio {p99[0] / p99[1]:.2f}; frames lost proxy {lost[0]}, "
      f"relay {lost[1]}")'
