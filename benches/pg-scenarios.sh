#!/usr/bin/env bash
# s1 (1 room x 2 clients, an edit every 20 ms) and s2 (100 rooms x 10 clients, an edit every
# 100 ms) against a fresh release server with the disk backend (--fsync always) and with
# PostgreSQL (synchronous_commit=on, a private server from scripts/pg-local.sh, a fresh
# database per run), alternating, RUNS times (default 3). Rows go to OUT/rows.md
# (default target/scenarios-pg), with the time and load average before each round.
# Environment: RUNS, DURATION (10s), WARMUP (2s), PORT (18180), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
PORT=${PORT:-18180}
OUT=${OUT:-target/scenarios-pg}
cargo build --release --bins --quiet
PG=$(scripts/pg-local.sh start --owner-pid $$)
mkdir -p "$OUT"
rm -f "$OUT/rows.md"

run() { # label backend load-flags...
  local label=$1 backend=$2 data pid db
  shift 2
  data=$(mktemp -d "${TMPDIR:-/tmp}/collab-scenario.XXXXXX")
  local extra=()
  if [ "$backend" = pg ]; then
    db="scenario_$(date +%s%N)"
    psql -q -X -v ON_ERROR_STOP=1 "$PG" -c "CREATE DATABASE $db"
    extra=(--database-url "${PG%/*}/$db")
  fi
  mkdir -p "$OUT/$label"
  # Every client comes from 127.0.0.1: lift the door's per-address limits (docs/limits.md).
  COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0 \
    target/release/collab-engine --listen "127.0.0.1:$PORT" --data-dir "$data" "${extra[@]}" \
    >"$OUT/$label/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  target/release/collab-load --url "ws://127.0.0.1:$PORT" --label "$label" --server-pid "$pid" \
    --out "$OUT/$label" --warmup "$WARMUP" --duration "$DURATION" "$@" >"$OUT/$label/report.txt" 2>&1 || true
  cat "$OUT/$label/row.md" >>"$OUT/rows.md" 2>/dev/null || echo "| $label | failed, see $OUT/$label |" >>"$OUT/rows.md"
  kill -TERM "$pid"
  wait "$pid" || true
  rm -rf "$data"
}

for r in $(seq "$RUNS"); do
  echo "round $r at $(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/rows.md"
  run "s1-disk-$r" disk --rooms 1 --clients-per-room 2 --edit-interval 20ms
  run "s1-pg-$r" pg --rooms 1 --clients-per-room 2 --edit-interval 20ms
  run "s2-disk-$r" disk --rooms 100 --clients-per-room 10 --edit-interval 100ms
  run "s2-pg-$r" pg --rooms 100 --clients-per-room 10 --edit-interval 100ms
done
cat "$OUT/rows.md"
