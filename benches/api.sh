#!/usr/bin/env bash
# Document API latency under the s2 load of benches/scenarios.sh (100 rooms x 10 clients, an
# edit every 100 ms each): RUNS runs (default 3) of N GET and N POST requests (default 300)
# by benches/api_latency.py, one at a time, against the release binary on the disk backend,
# while collab-load runs (LOAD_DURATION, default 60s, must outlast the measurement).
# Prints one line per run (docs/benchmarks.md has the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PORT=${PORT:-18090}
N=${N:-300}
cargo build --release --bins --quiet
# One connection per API request: the per-address door limits are not what is measured.
export COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0 COLLAB_CONNECTS_PER_IP_BURST=0
SERVER_PID=
LOAD_PID=
DATA_DIR=
cleanup() {
  [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
  [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$DATA_DIR" ] && rm -rf "$DATA_DIR"
  return 0
}
trap cleanup EXIT
for run in $(seq "$RUNS"); do
  DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/collab-api-bench.XXXXXX")
  target/release/collab-engine --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" >"$DATA_DIR/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  target/release/collab-load --url "ws://127.0.0.1:$PORT" --rooms 100 --clients-per-room 10 \
    --edit-interval 100ms --duration "${LOAD_DURATION:-60s}" >"$DATA_DIR/load.log" 2>&1 &
  LOAD_PID=$!
  sleep 5 # every client joined and editing
  echo "run $run: $(python3 benches/api_latency.py "127.0.0.1:$PORT" "$N")"
  # The load must still be running, and clean, when the measurement ends.
  if ! kill -0 "$LOAD_PID" 2>/dev/null; then
    echo "run $run: the load ended before the measurement did; raise LOAD_DURATION" >&2
    exit 1
  fi
  wait "$LOAD_PID" || { echo "run $run: collab-load failed:" >&2; tail -n 20 "$DATA_DIR/load.log" >&2; exit 1; }
  LOAD_PID=
  echo "run $run load: $(grep -E '^(errors|convergence)' "$DATA_DIR/load.log" | tr '\n' ' ' | cut -c1-160)"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  rm -rf "$DATA_DIR"
  DATA_DIR=
done
