#!/usr/bin/env bash
# Every figure in BENCHMARKS.md, in one go (about 50 minutes on the 2-core machine).
# Raw loadgen reports (JSON, one per line, prefixed with the target) and the knee and CPU
# tables go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)

echo "== 1000 calls x fan-out 2, 60 s"
bench/run.sh 1000 2 60s 20s | tee "$out/$stamp-1000x2.jsonl"
echo "== 500 calls x fan-out 2, 60 s"
bench/run.sh 500 2 60s 20s | tee "$out/$stamp-500x2.jsonl"
echo "== knee, fan-out 1 2 4"
# Each search starts a step or two below where the knee was last found on this machine.
bench/knee.sh "1" 1000 100 2000 30s 10s | tee "$out/$stamp-knee.txt"
bench/knee.sh "2" 500 100 2000 30s 10s | tee -a "$out/$stamp-knee.txt"
bench/knee.sh "4" 300 50 1000 30s 10s | tee -a "$out/$stamp-knee.txt"
echo "== CPU per frame and p99 against the relay's, alternating proxy and relay"
for fanout in 1 2 4; do
  bench/cpu.sh 500 "$fanout" 20s 5 | tee -a "$out/$stamp-cpu.txt"
done
echo "== soak: 500 calls x fan-out 2, 10 minutes, proxy only"
TARGETS=proxy bench/run.sh 500 2 600s 20s | tee "$out/$stamp-soak.jsonl"
