#!/usr/bin/env bash
# Connection density and hot path (docs/benchmarks.md, "## Connection density and hot path").
#
# Idle memory: starts a release server with in-memory storage, joins many idle WebSocket
# clients with collab-load (no writer), and prints the server's RSS growth per connection, for:
#   idle-5     3,900 documents x 5 clients      (s5 of the load scenarios)
#   idle-1     1 document x 19,500 clients     (connection cost without per-document cost)
#   join-150   1 preloaded 105 KB document x 150 clients  (what a joiner keeps after its snapshot)
#   join-1000  the same with 1,000 clients
# Hot path (HOT=1): 100 documents x 10 clients, an edit every 100 ms per client, with the
# server's write/read syscalls and CPU time counted by `perf stat` over the whole run.
#
# Usage: benches/density.sh [BIN]   (BIN: a server binary to measure instead of this tree's,
# e.g. one built from an older commit). Environment: PORT (default 18190), HOT=1.
# The open-file limit caps the sizes: 19,500 connections need `ulimit -n` 20,000 for the
# server and the generator each (the script raises the soft limit to the hard one).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-18190}
# Every client comes from 127.0.0.x: lift the per-address door limits (docs/limits.md) for the load.
export COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0
cargo build --release --bins --quiet
BIN=${1:-target/release/collab-engine}
LOAD=target/release/collab-load
PRELOAD=tests/data/automerge-paper.json.gz
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
OUT=$(mktemp -d "${TMPDIR:-/tmp}/collab-density.XXXXXX")

SERVER_PID=
start_server() {
  "$BIN" --listen "127.0.0.1:$PORT" --storage memory --idle-timeout 600s >"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server did not start; see $OUT/server.log" >&2
  exit 1
}
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap 'stop_server' EXIT

idle() { # name, collab-load flags...
  local name=$1; shift
  start_server
  "$LOAD" --url "ws://127.0.0.1:$PORT" --writers-per-room 0 --warmup 0s --duration 3s \
    --bind 127.0.0.2,127.0.0.3,127.0.0.4 --server-pid "$SERVER_PID" "$@" >"$OUT/$name.txt" 2>&1 || true
  printf '%-10s %s\n' "$name" "$(grep -E '^server:' "$OUT/$name.txt" | sed 's/^server: //')"
  stop_server
}

idle idle-5 --rooms 3900 --clients-per-room 5
idle idle-1 --rooms 1 --clients-per-room 19500
idle join-150 --rooms 1 --clients-per-room 150 --preload "$PRELOAD"
idle join-1000 --rooms 1 --clients-per-room 1000 --preload "$PRELOAD"

if [ "${HOT:-0}" = 1 ]; then
  start_server
  perf stat -p "$SERVER_PID" -o "$OUT/perf-stat.txt" \
    -e task-clock,syscalls:sys_enter_sendmsg,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait &
  STAT_PID=$!
  "$LOAD" --url "ws://127.0.0.1:$PORT" --rooms 100 --clients-per-room 10 --edit-interval 100ms \
    --warmup 2s --duration 10s --server-pid "$SERVER_PID" >"$OUT/hot.txt" 2>&1 || true
  kill -INT "$STAT_PID"; wait "$STAT_PID" || true
  grep -E '^(window|server:)|^delivery ' "$OUT/hot.txt"
  grep -E 'task-clock|syscalls' "$OUT/perf-stat.txt"
  stop_server
fi
echo "reports in $OUT"
