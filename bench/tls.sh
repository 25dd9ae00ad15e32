#!/usr/bin/env bash
# wss:// backends against ws:// ones, same load: CPU per forwarded frame and memory per live
# call, PAIRS alternating runs of each (so a burst of outside load hits both alike), medians.
#   bench/tls.sh CALLS FANOUT DURATION PAIRS      e.g. bench/tls.sh 500 2 20s 3
# The sinks are loadgen's, on fixed loopback ports, named in the proxy's backend table; for
# wss they serve a localhost certificate from a CA loadgen makes, which the proxy trusts
# through ca_file. Prints each run's figures, then the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
calls=${1:-500}
fanout=${2:-2}
duration=${3:-20s}
pairs=${4:-3}
base_port=19100
tls_dir=target/bench-tls

cargo build --release --workspace --quiet
bin=target/release
"$bin/loadgen" --make-tls "$tls_dir" 2>/dev/null

run_once() {
  local scheme=$1
  local env=(CALL_PROXY__LOG__FILTER=warn)
  local tls_args=()
  for i in $(seq 0 $((fanout - 1))); do
    local key=CALL_PROXY__BACKENDS__TABLE__SINK${i}
    env+=("${key}__FORMAT=twilio")
    if [ "$scheme" = wss ]; then
      env+=("${key}__URL=wss://localhost:$((base_port + i))/media" "${key}__CA_FILE=$tls_dir/ca.pem")
    else
      env+=("${key}__URL=ws://127.0.0.1:$((base_port + i))/media")
    fi
  done
  [ "$scheme" = wss ] && tls_args=(--sink-tls "$tls_dir")
  bench_point "${env[@]}" -- --calls "$calls" --fanout "$fanout" --duration "$duration" \
    --ramp 5s --sink-base-port "$base_port" "${tls_args[@]}" \
    | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(round(r["proxy_cpu_ms_per_1000_frames"] or 0, 2), round(r["proxy_rss_kib_per_call"] or 0, 1),
      r["frames_lost"], r["latency"]["p99_ms"])' 2>/dev/null || echo "0 0 -1 0"
}

figures=()
for i in $(seq "$pairs"); do
  for scheme in ws wss; do
    line=$(run_once "$scheme")
    echo "$scheme run=$i calls=$calls fanout=$fanout cpu_ms_per_1000_frames,rss_kib_per_call,lost,p99_ms= $line"
    figures+=("$scheme $line")
  done
done
printf '%s\n' "${figures[@]}" | python3 -c "
import statistics, sys
runs = {}
for line in sys.stdin:
    scheme, cpu, rss, lost, p99 = line.split()
    runs.setdefault(scheme, []).append((float(cpu), float(rss), int(lost), float(p99)))
med = lambda s, k: statistics.median(r[k] for r in runs[s])
ws_cpu, wss_cpu = med('ws', 0), med('wss', 0)
ws_rss, wss_rss = med('ws', 1), med('wss', 1)
print(f'median CPU per 1000 frames: ws {ws_cpu:.2f} ms, wss {wss_cpu:.2f} ms, ratio {wss_cpu / ws_cpu:.2f}')
print(f'median memory per live call: ws {ws_rss:.1f} KiB, wss {wss_rss:.1f} KiB; per TLS link {(wss_rss - ws_rss) / $fanout:.1f} KiB more')
print(f'median p99: ws {med(\"ws\", 3):.2f} ms, wss {med(\"wss\", 3):.2f} ms; frames lost: ws {sum(r[2] for r in runs[\"ws\"])}, wss {sum(r[2] for r in runs[\"wss\"])}')
"
