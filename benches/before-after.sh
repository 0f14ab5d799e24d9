#!/usr/bin/env bash
# Alternating before/after runs of s1 and s2 (disk storage, --fsync always), 3 rounds of 10 s
# after a 2 s warm-up, one fresh server per run: BEFORE is a checkout of an older commit with
# its release binaries built (`git worktree add --detach ../base REV && cargo build --release
# --bins` there), AFTER this tree's. The generator is always this tree's collab-load.
# Usage: BEFORE=../base benches/before-after.sh; rows in target/before-after/rows.txt.
set -u
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:?a checkout of the older commit, with target/release built}
AFTER=$(pwd)
OUT=target/before-after; mkdir -p $OUT; : > $OUT/rows.txt
PORT=${PORT:-18290}
run() { # label bin-dir flags...
  local label=$1 dir=$2; shift 2
  local data
  data=$(mktemp -d "${TMPDIR:-/tmp}/collab-ab.XXXXXX")
  COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0 $dir/target/release/collab-engine --listen 127.0.0.1:$PORT --data-dir $data >$OUT/$label.server.log 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
  $AFTER/target/release/collab-load --url ws://127.0.0.1:$PORT --server-pid $pid --warmup 2s --duration 10s "$@" > $OUT/$label.txt 2>&1
  kill -TERM $pid; wait $pid 2>/dev/null
  rm -rf $data
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  echo "$label load=$load $(grep -E '^delivery ' $OUT/$label.txt) | $(grep 'server CPU per delivery' $OUT/$label.txt)" >> $OUT/rows.txt
}
for r in 1 2 3; do
  run s1-before-$r $BEFORE --rooms 1 --clients-per-room 2 --edit-interval 20ms
  run s1-after-$r $AFTER --rooms 1 --clients-per-room 2 --edit-interval 20ms
  run s2-before-$r $BEFORE --rooms 100 --clients-per-room 10 --edit-interval 100ms
  run s2-after-$r $AFTER --rooms 100 --clients-per-room 10 --edit-interval 100ms
done
echo done >> $OUT/rows.txt
