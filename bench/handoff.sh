#!/usr/bin/env bash
# Live hand-off at scale: CALLS one-way calls of 20 s on instance A (two instances of the
# release build on one redis-server, behind a balancer that asks /readyz), SIGTERM 5 s in, every
# call moved to B at once through a fake Twilio REST API that streams the same audio to both
# streams of a call. Prints one JSON line: how long moving all took, frames lost and repeated
# over every call, and how each join came out (exact, one frame repeated, one missing, worse).
#   bench/handoff.sh [CALLS]   e.g. bench/handoff.sh 200
# The harness is the hand-off test suite's (tests/common/fake_twilio.rs), in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-200}
HANDOFF_CALLS="$calls" cargo test --release --quiet --test handoff -- --ignored --nocapture \
  bench_many_calls_hand_off_at_once 2>&1 | grep '"moved_all_in_ms"'
