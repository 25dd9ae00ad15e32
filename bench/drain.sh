#!/usr/bin/env bash
# A drain at full load: CALLS calls x FANOUT sinks stream for DURATION after a RAMP; SPLIT
# into the full-load window the proxy gets SIGTERM. Every call must run to its own end with
# zero frames lost, /readyz must answer 503 at once, the process must exit 0 as soon as the
# last call has ended, and the added latency during the drain (loadgen's window after the
# split) is compared with the same run's window before it.
#   bench/drain.sh [CALLS] [FANOUT] [DURATION] [RAMP] [SPLIT]   e.g. bench/drain.sh 200 2 40s 10s 15s
# Prints loadgen's JSON on one line, then one line `drain {...}` with what the proxy did.
# CONTROL=1 runs the same load without the signal (the proxy is stopped after loadgen ends),
# so the two windows can be compared with and without a drain in between.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
calls=${1:-200}
fanout=${2:-2}
duration=${3:-40s}
ramp=${4:-10s}
split=${5:-15s}

cargo build --release --workspace --quiet
bin=target/release
secs() { case $1 in *ms) echo "scale=3; ${1%ms}/1000" | bc ;; *s) echo "${1%s}" ;; esac; }

env "${BENCH_PROXY_ENV[@]}" CALL_PROXY__BACKENDS__HOSTS_FORMAT=twilio \
  CALL_PROXY__LOG__FORMAT=json CALL_PROXY__LOG__FILTER=info \
  "$bin/call-proxy" 2>target/bench-drain-proxy.log &
pid=$!
sleep 1
"$bin/loadgen" --url "$BENCH_PROXY_URL" --calls "$calls" --fanout "$fanout" \
  --duration "$duration" --ramp "$ramp" --split-at "$split" --proxy-pid "$pid" \
  --json --quiet >target/bench-drain-loadgen.json &
loadgen=$!

sleep "$(echo "$(secs "$ramp") + $(secs "$split")" | bc)"
if [ "${CONTROL:-0}" = 1 ]; then
  wait "$loadgen"
fi
signalled=$(date +%s.%N)
kill -TERM "$pid"
sleep 0.3
ready=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18999/readyz || true)
# The moment the process is gone, and its exit status.
while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
exited=$(date +%s.%N)
set +e
wait "$pid"
status=$?
set -e
wait "$loadgen" || true
tr -d '\n' <target/bench-drain-loadgen.json
echo
drained_ms=$(grep -o '"message":"drained: no call is left"[^}]*' target/bench-drain-proxy.log \
  | grep -o 'took_ms":[0-9]*' | cut -d: -f2 || true)
refused=$(grep -c 'stream refused' target/bench-drain-proxy.log || true)
echo "$([ "${CONTROL:-0}" = 1 ] && echo control || echo drain) {\"readyz_after_300ms\":$ready,\"exit_status\":$status,\"drain_ms\":${drained_ms:-null},\"signal_to_exit_s\":$(echo "$exited - $signalled" | bc),\"streams_refused\":$refused}"
