# Shared by the bench scripts: how the proxy is started for a measurement. Loopback only,
# no limits on upgrades from one address (every simulated call comes from loadgen's), no
# default backend, nothing written to disk, quiet logs.
# shellcheck shell=bash
BENCH_PROXY_ENV=(
  CALL_PROXY__SERVER__HOST=127.0.0.1
  CALL_PROXY__SERVER__PORT=18999
  CALL_PROXY__BACKENDS__DEFAULT=
  CALL_PROXY__STORE__PATH=
  CALL_PROXY__RATE_LIMITS__UPGRADES_PER_IP_PER_MINUTE=0
  CALL_PROXY__RATE_LIMITS__HTTP_PER_IP_PER_MINUTE=0
)
BENCH_PROXY_URL=ws://127.0.0.1:18999/media

# bench_point ENV... -- LOADGEN-ARGS...: starts the proxy with BENCH_PROXY_ENV plus ENV, runs
# loadgen against it (with --proxy-pid, --json, --quiet), prints loadgen's JSON on one line
# (nothing if it failed), and stops the proxy. Expects $bin.
bench_point() {
  local env=("${BENCH_PROXY_ENV[@]}")
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    env+=("$1")
    shift
  done
  shift
  env "${env[@]}" "$bin/call-proxy" 2>target/bench-proxy.log &
  local pid=$!
  sleep 1
  "$bin/loadgen" --url "$BENCH_PROXY_URL" --proxy-pid "$pid" --json --quiet "$@" \
    | tr -d '\n' || true
  echo
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 1
}
