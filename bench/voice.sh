#!/usr/bin/env bash
# The voice-agent paths against the plain fan-out, same load, alternating runs, medians:
#   bench/voice.sh CALLS FANOUT DURATION PAIRS      e.g. bench/voice.sh 500 2 20s 3
#  - CPU per frame of pcm16 (16 kHz) backends against twilio-format ones;
#  - a speaking backend (sink0 answers every frame): the latency the proxy adds on the way
#    back to the caller, and loss;
#  - a backend that floods: the others' loss and p99, and the proxy's memory.
# loadgen's sinks sit on fixed loopback ports, named in the proxy's backend table.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
calls=${1:-500}
fanout=${2:-2}
duration=${3:-20s}
pairs=${4:-3}
base_port=19200

cargo build --release --workspace --quiet
bin=target/release

# run_once FORMAT speak|flood|plain
run_once() {
  local format=$1 mode=$2
  local env=(CALL_PROXY__LOG__FILTER=error)
  local sinks=$fanout
  [ "$mode" = flood ] && sinks=$((fanout + 1))
  for i in $(seq 0 $((sinks - 1))); do
    local key=CALL_PROXY__BACKENDS__TABLE__SINK${i}
    env+=("${key}__URL=ws://127.0.0.1:$((base_port + i))/media" "${key}__FORMAT=$format")
    [ "$format" = pcm16 ] && env+=("${key}__SAMPLE_RATE=16000")
  done
  [ "$mode" = speak ] && env+=("CALL_PROXY__BACKENDS__TABLE__SINK0__SPEAKS=true")
  local args=()
  [ "$mode" = speak ] && args=(--speak)
  [ "$mode" = flood ] && args=(--flood)
  bench_point "${env[@]}" -- --calls "$calls" --fanout "$fanout" --duration "$duration" \
    --ramp 5s --sink-base-port "$base_port" "${args[@]}" \
    | python3 -c '
import json, sys
r = json.load(sys.stdin)
t = r.get("talkback") or {}
tl = t.get("latency") or {}
print(round(r["proxy_cpu_ms_per_1000_frames"] or 0, 2), r["frames_lost"], r["latency"]["p99_ms"],
      round(r["proxy"]["rss_full_mib"], 1), t.get("received", 0), tl.get("p50_ms", 0), tl.get("p99_ms", 0))' \
    2>/dev/null || echo "0 -1 0 0 0 0 0"
}

figures=()
for i in $(seq "$pairs"); do
  for run in "twilio twilio plain" "pcm16 pcm16 plain" "speak twilio speak" "flood twilio flood"; do
    set -- $run
    line=$(run_once "$2" "$3")
    echo "$1 run=$i calls=$calls fanout=$fanout cpu_ms_per_1000,lost,p99_ms,rss_mib,heard_back,back_p50_ms,back_p99_ms= $line"
    figures+=("$1 $line")
  done
done
summary=$(mktemp)
printf '%s\n' "${figures[@]}" >"$summary"
python3 - "$summary" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, *v = line.split()
    runs.setdefault(label, []).append([float(x) for x in v])
def med(label, k):
    return statistics.median(r[k] for r in runs[label])
def lost(label):
    return int(sum(r[1] for r in runs[label]))
print("median CPU per 1000 frames: twilio %.2f ms, pcm16 16 kHz %.2f ms, ratio %.2f"
      % (med("twilio", 0), med("pcm16", 0), med("pcm16", 0) / med("twilio", 0)))
print("speaking backend: way back p50 %.2f ms, p99 %.2f ms; heard back %.0f frames; forward p99 %.2f ms; lost %d"
      % (med("speak", 5), med("speak", 6), med("speak", 4), med("speak", 2), lost("speak")))
print("flooding backend: the others' p99 %.2f ms (plain %.2f ms), lost %d; proxy RSS %.1f MiB (plain %.1f MiB)"
      % (med("flood", 2), med("twilio", 2), lost("flood"), med("flood", 3), med("twilio", 3)))
print("frames lost: twilio %d, pcm16 %d" % (lost("twilio"), lost("pcm16")))
PY
rm -f "$summary"
