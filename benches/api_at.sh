#!/usr/bin/env bash
# Cost of ?at= against the distance from the head (benches/api_at.py), RUNS runs (default 3)
# against the release binary on the disk backend, without other load.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PORT=${PORT:-18092}
cargo build --release --bins --quiet
export COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0 COLLAB_CONNECTS_PER_IP_BURST=0
SERVER_PID=
DATA_DIR=
cleanup() {
  [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$DATA_DIR" ] && rm -rf "$DATA_DIR"
  return 0
}
trap cleanup EXIT
for run in $(seq "$RUNS"); do
  DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/collab-api-at.XXXXXX")
  target/release/collab-engine --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" >"$DATA_DIR/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "run $run: $(python3 benches/api_at.py "127.0.0.1:$PORT")"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  rm -rf "$DATA_DIR"
  DATA_DIR=
done
