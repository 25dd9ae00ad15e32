#!/usr/bin/env bash
# One benchmark point: loadgen against the proxy, then against the bare relay, same load.
#   bench/run.sh CALLS FANOUT DURATION [RAMP]      e.g. bench/run.sh 1000 2 60s 20s
# Release builds; everything on 127.0.0.1; each process stops by itself.
# Prints each target's loadgen report as one JSON line, prefixed with the target's name;
# the proxy's own log goes to target/bench-proxy.log.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
calls=${1:-500}
fanout=${2:-2}
duration=${3:-60s}
ramp=${4:-20s}
targets=${TARGETS:-"proxy relay"}

cargo build --release --workspace --quiet
bin=target/release

run_point() {
  local name=$1 url=$2 pid=$3
  "$bin/loadgen" --url "$url" --calls "$calls" --fanout "$fanout" \
    --duration "$duration" --ramp "$ramp" --proxy-pid "$pid" --json --quiet \
    | tr -d '\n' | sed "s/^/$name /"
  echo
}

for target in $targets; do
  case $target in
    proxy)
      # The proxy as the benchmark needs it: loopback sinks via backendHosts in the Twilio
      # format (bytes forwarded as received, like the relay), no limits on upgrades from one
      # address (every simulated call comes from loadgen's), nothing written to disk.
      env "${BENCH_PROXY_ENV[@]}" CALL_PROXY__BACKENDS__HOSTS_FORMAT=twilio \
        CALL_PROXY__LOG__FILTER=warn "$bin/call-proxy" 2>target/bench-proxy.log &
      pid=$!
      url=$BENCH_PROXY_URL
      ;;
    relay)
      "$bin/bare-relay" 127.0.0.1:19000 >/dev/null &
      pid=$!
      url=ws://127.0.0.1:19000/media
      ;;
  esac
  sleep 1
  run_point "$target" "$url" "$pid" || true
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 1
done
