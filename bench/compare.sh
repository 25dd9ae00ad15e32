#!/usr/bin/env bash
# This checkout's proxy against another checkout's (a build before a change), same load,
# alternating runs, medians — what a change costs per forwarded frame and in p99:
#   bench/compare.sh OTHER_CHECKOUT CALLS FANOUT DURATION PAIRS
#   e.g. git worktree add ../before HEAD~1 && bench/compare.sh ../before 500 2 20s 4
# Each checkout builds and runs its own release binaries (bench/run.sh there).
set -euo pipefail
cd "$(dirname "$0")/.."
other=$1
calls=${2:-500}
fanout=${3:-2}
duration=${4:-20s}
pairs=${5:-4}

runs=()
for i in $(seq "$pairs"); do
  for side in this before; do
    dir=.
    [ "$side" = before ] && dir=$other
    line=$( (cd "$dir" && TARGETS=proxy bench/run.sh "$calls" "$fanout" "$duration" 5s 2>/dev/null) | grep "^proxy ")
    figures=$(echo "${line#* }" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(round(r["proxy_cpu_ms_per_1000_frames"] or 0, 2), r["latency"]["p99_ms"],
      r["frames_lost"], round(r["proxy_rss_kib_per_call"] or 0, 1))')
    echo "$side run=$i calls=$calls fanout=$fanout cpu_ms_per_1000_frames,p99_ms,lost,kib_per_call= $figures"
    runs+=("$side $figures")
  done
done
printf '%s\n' "${runs[@]}" | python3 -c '
import statistics, sys
runs = {}
for line in sys.stdin:
    side, cpu, p99, lost, kib = line.split()
    runs.setdefault(side, []).append((float(cpu), float(p99), int(lost), float(kib)))
def med(side, i):
    return statistics.median(r[i] for r in runs[side])
def lost(side):
    return sum(r[2] for r in runs[side])
this, before = "this", "before"
print("medians of %d pairs: CPU per 1000 frames %.2f vs %.2f ms (%.3fx), p99 %.2f vs %.2f ms, "
      "KiB per call %.1f vs %.1f, lost %d vs %d" % (
          len(runs[this]), med(this, 0), med(before, 0), med(this, 0) / med(before, 0),
          med(this, 1), med(before, 1), med(this, 3), med(before, 3), lost(this), lost(before)))'
