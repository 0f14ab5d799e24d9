#!/usr/bin/env bash
# Runs the load scenarios of docs/benchmarks.md ("## Load scenarios"), each against a fresh
# release server on 127.0.0.1 that this script starts with the scenario's flags, and writes the
# table of results to OUT/table.md. One command: benches/scenarios.sh  (a few minutes);
# one scenario: benches/scenarios.sh s3-fanout  (names below; several may be given).
# The tracked docs/benchmarks.md is left alone unless asked: `benches/scenarios.sh --update-docs`
# (or UPDATE_DOCS=1) rewrites its generated table with this run's, and needs every scenario.
#
# Environment: PORT (default 18080), DURATION (measured seconds, default 10s), WARMUP (2s),
# OUT (reports, default target/scenarios), ONLY (space-separated scenario names to run),
# UPDATE_DOCS=1 (as --update-docs), PERF=1 (record the server with perf into OUT), NICE=-10 (run server and generator at that
# niceness, root only: on a host busy with other work this shows what the code does when it gets
# the CPU; say so when you publish such numbers), SERVER_CPUS / LOAD_CPUS (taskset CPU lists, e.g.
# SERVER_CPUS=0 LOAD_CPUS=1 gives each its own core on a 2-core host).
set -euo pipefail
cd "$(dirname "$0")/.."

UPDATE_DOCS=${UPDATE_DOCS:-0}
NAMES=()
for arg in "$@"; do
  case "$arg" in
    --update-docs) UPDATE_DOCS=1 ;;
    -*)
      echo "scenarios.sh: unknown option $arg (scenario names and --update-docs only)" >&2
      exit 2
      ;;
    *) NAMES+=("$arg") ;;
  esac
done
if [ ${#NAMES[@]} -gt 0 ]; then ONLY="${NAMES[*]}"; fi
if [ "$UPDATE_DOCS" = 1 ] && [ -n "${ONLY:-}" ]; then
  echo "scenarios.sh: --update-docs rewrites the whole table, so it runs every scenario (no names, no ONLY)" >&2
  exit 2
fi
PORT=${PORT:-18080}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
OUT=${OUT:-target/scenarios}
NICE=${NICE:-0}
SERVER="nice -n $NICE ${SERVER_CPUS:+taskset -c $SERVER_CPUS} target/release/collab-engine"
# Every client comes from 127.0.0.x: lift the per-address door limits (docs/limits.md) for the load.
export COLLAB_CONNS_PER_IP_MAX=0 COLLAB_CONNECTS_PER_IP_PER_SECOND=0
LOAD="nice -n $NICE ${LOAD_CPUS:+taskset -c $LOAD_CPUS} target/release/collab-load"
PRELOAD=tests/data/automerge-paper.json.gz

cargo build --release --bins --quiet
mkdir -p "$OUT"
rm -f "$OUT"/rows.md

# Raise the open-file limit as far as the hard limit allows (server and generator inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)

SERVER_PID=
DATA_DIR=
start_server() { # name, server flags...
  local name=$1; shift
  DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/collab-scenario.XXXXXX")
  if [ "${PERF:-0}" = 1 ] && command -v perf >/dev/null; then
    # shellcheck disable=SC2086
    perf record -F 499 -g -o "$OUT/$name/perf.data" -- \
      $SERVER --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" "$@" >"$OUT/$name/server.log" 2>&1 &
  else
    # shellcheck disable=SC2086
    $SERVER --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" "$@" >"$OUT/$name/server.log" 2>&1 &
  fi
  SERVER_PID=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server did not start; see $OUT/$name/server.log" >&2
  return 1
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  rm -rf "$DATA_DIR"
}
trap 'stop_server' EXIT

# Accept-queue overflows (each costs the client a 1 s SYN retransmit), from /proc/net/netstat.
listen_overflows() {
  awk '/^TcpExt:/ { if (!n) { for (i = 1; i <= NF; i++) col[$i] = i; n = 1 } else print $col["ListenOverflows"] }' \
    /proc/net/netstat 2>/dev/null || echo 0
}

# scenario NAME "SERVER FLAGS" LOAD FLAGS...
scenario() {
  local name=$1 server_flags=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  rm -rf "${OUT:?}/$name"
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086
  start_server "$name" $server_flags
  local pid=$SERVER_PID
  # Under perf (or nice, which execs) the server may be a child of the started process.
  pid=$(pgrep -P "$SERVER_PID" collab-engine || echo "$SERVER_PID")
  echo "== $name: server $server_flags; load $*"
  local overflows_before
  overflows_before=$(listen_overflows)
  # shellcheck disable=SC2086
  $LOAD --url "ws://127.0.0.1:$PORT" --label "$name" --server-pid "$pid" --out "$OUT/$name" \
    --warmup "$WARMUP" --duration "$DURATION" "$@" | tee "$OUT/$name/report.txt" || true
  echo "kernel ListenOverflows during the run: $(( $(listen_overflows) - overflows_before ))" | tee -a "$OUT/$name/report.txt"
  stop_server
  if [ -f "$OUT/$name/row.md" ]; then cat "$OUT/$name/row.md" >>"$OUT/rows.md"; fi
}

# Scenario 5 wants 50,000 idle connections; each process here may hold at most FD_LIMIT.
DENSITY_CONNS=$(( FD_LIMIT - 500 < 50000 ? (FD_LIMIT - 500) / 5 * 5 : 50000 ))
DENSITY_ROOMS=$(( DENSITY_CONNS / 5 ))
BIND=127.0.0.2,127.0.0.3,127.0.0.4

scenario s1-latency "" --rooms 1 --clients-per-room 2 --edit-interval 20ms
scenario s2-rooms "" --rooms 100 --clients-per-room 10 --edit-interval 100ms
scenario s3-fanout "" --rooms 1 --clients-per-room 1501 --writers-per-room 1 --edit-interval 10ms
scenario s4-many-rooms "" --rooms 1000 --clients-per-room 5 --edit-interval 500ms
scenario s5-density "" --rooms "$DENSITY_ROOMS" --clients-per-room 5 --writers-per-room 0 \
  --bind "$BIND" --warmup 1s --duration 3s --connect-concurrency 256
scenario s6-join-storm "" --rooms 1 --clients-per-room 150 --writers-per-room 0 --preload "$PRELOAD" \
  --warmup 0s --duration 1s
scenario s7-shards-1 "--shards 1" --rooms 100 --clients-per-room 10 --edit-interval 100ms
scenario s7-shards-2 "--shards 2" --rooms 100 --clients-per-room 10 --edit-interval 100ms
scenario s2-fsync-never "--fsync never" --rooms 100 --clients-per-room 10 --edit-interval 100ms

trap - EXIT
if [ ! -f "$OUT/rows.md" ]; then exit 0; fi

# The generated table, between the markers that docs/benchmarks.md keeps it in.
TABLE="$OUT/table.md"
{
  echo "<!-- load-scenarios:begin (generated by benches/scenarios.sh; edit outside the markers) -->"
  if grep -qh "disk storage is not built in" "$OUT"/*/server.log 2>/dev/null; then
    echo "**Storage: this server build kept documents in memory (its disk backend was not built in), so \`--fsync\` had no effect.**"
  else
    echo "Storage: disk (\`--data-dir\` in a fresh temporary folder), \`--fsync always\` unless the scenario says otherwise."
  fi
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), server and generator on the same machine, open-file limit $FD_LIMIT, measured ${DURATION} after ${WARMUP} warm-up."
  echo
  echo "| scenario | conns joined/failed/lost | edits/s offered | msgs/s delivered | delivery p50 / p99 / p99.9 / max (ms) | echo p99 (ms) | join all (ms) | server CPU cores / run-queue wait | server CPU µs/delivery | server RSS/conn | host load | converged |"
  echo "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
  cat "$OUT/rows.md"
  echo "<!-- load-scenarios:end -->"
} >"$TABLE"
echo "table: $TABLE"
if [ "$UPDATE_DOCS" != 1 ]; then
  echo "docs/benchmarks.md left alone (benches/scenarios.sh --update-docs rewrites its table)"
  exit 0
fi
DOC=docs/benchmarks.md
if [ -f "$DOC" ] && grep -q "load-scenarios:begin" "$DOC"; then
  awk -v table="$TABLE" '
    /load-scenarios:begin/ { while ((getline line < table) > 0) print line; skip = 1; next }
    /load-scenarios:end/ { skip = 0; next }
    !skip { print }' "$DOC" >"$DOC.tmp" && mv "$DOC.tmp" "$DOC"
  echo "updated $DOC"
else
  echo "no markers in $DOC; table left in $TABLE"
fi
