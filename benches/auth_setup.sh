#!/usr/bin/env bash
# Connection setup with access control off, HS256 and EdDSA, interleaved in one session:
# RUNS rounds (default 3), each round one fresh release server per mode on 127.0.0.1, CLIENTS
# connections (default 5,000: 50 rooms of 100, one writer per room editing every second) joined by
# collab-load (which mints one token per client with --mint-key-file, before connecting). Prints
# one line per run with the join-latency p50/p99 (TCP connect to hello_ack) and the time until all
# joined, from collab-load's summary.json. docs/benchmarks.md ("Access control") has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
ROOMS=${ROOMS:-50}
PER_ROOM=${PER_ROOM:-100}
PORT=${PORT:-18090}
OUT=${OUT:-target/auth_setup}
cargo build --release --bins --quiet
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"
KEYS=$(mktemp -d "${TMPDIR:-/tmp}/collab-auth-keys.XXXXXX")
head -c 48 /dev/urandom > "$KEYS/hs.key"
cargo build --release --quiet --example auth_keypair
target/release/examples/auth_keypair "$KEYS/ed-private.pem" "$KEYS/ed.pem"

run() { # label, server flags..., then -- collab-load flags...
  local label=$1; shift
  local server_flags=() load_flags=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do server_flags+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  load_flags=("$@")
  # Every client comes from 127.0.0.1: lift the door's per-address limits (docs/limits.md).
  COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0 \
    target/release/collab-engine --listen "127.0.0.1:$PORT" --storage memory --fsync never \
    --no-pin-cores "${server_flags[@]}" >"$OUT/$label.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  target/release/collab-load --url "ws://127.0.0.1:$PORT" --rooms "$ROOMS" \
    --clients-per-room "$PER_ROOM" --writers-per-room 1 --edit-interval 1s --warmup 0s \
    --duration 1s --no-check --label "$label" --out "$OUT/$label" "${load_flags[@]}" \
    >"$OUT/$label.load.log" 2>&1 || true
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 - "$OUT/$label/summary.json" "$label" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
j, c = s["latency_ms"]["join"], s["counters"]
print(f"{sys.argv[2]:>9}: joined {c['conns_joined']} failed {c['conns_failed']}, "
      f"join p50 {j['p50']:.2f} ms p99 {j['p99']:.2f} ms max {j['max']:.2f} ms, "
      f"all joined in {s['join_all_ms']:.0f} ms, host load {s['host_load_1m']}")
PY
}

for round in $(seq "$RUNS"); do
  run "off-$round"
  run "hs256-$round" --auth-key-file "$KEYS/hs.key" -- --mint-key-file "$KEYS/hs.key"
  run "eddsa-$round" --auth-key-file "$KEYS/ed.pem" -- --mint-key-file "$KEYS/ed-private.pem"
done
rm -rf "$KEYS"
