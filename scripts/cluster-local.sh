#!/usr/bin/env bash
# Three collab-engine nodes on one private PostgreSQL, on 127.0.0.1, to try the cluster
# (docs/cluster.md).
#
#   scripts/cluster-local.sh [--base-port PORT] [--lease-ttl DURATION] [--binary PATH]
#
# Starts a throw-away PostgreSQL (scripts/pg-local.sh), builds the release binary when no
# --binary is given, starts nodes n1, n2, n3 on PORT+1, PORT+2, PORT+3 (default base 9100) with
# their data directories and logs under a temporary directory, prints their addresses and
# GET /cluster, then waits; Ctrl-C (or SIGTERM) drains the nodes one by one, stops the database
# and removes the directory. Connect any client to any node: a node that does not own a
# document relays the connection to its owner.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
base_port=9100
ttl=5s
binary=""
while [ $# -gt 0 ]; do
    case "$1" in
        --base-port) base_port="$2"; shift 2 ;;
        --lease-ttl) ttl="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "cluster-local.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$binary" ]; then
    (cd "$root" && cargo build --release --bin collab-engine >&2)
    binary="$root/target/release/collab-engine"
fi
[ -x "$binary" ] || { echo "cluster-local.sh: $binary is not executable" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/collab-cluster.XXXXXX")"
# The database runs as an unprivileged user, which must reach its directory inside.
chmod 755 "$work"
pids=()
cleanup() {
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    "$here/pg-local.sh" stop "$work/pg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

url="$("$here/pg-local.sh" start --dir "$work/pg" --owner-pid $$ | tail -n 1)"
echo "database: $url" >&2
for i in 1 2 3; do
    port=$((base_port + i))
    "$binary" --listen "127.0.0.1:$port" --advertise "127.0.0.1:$port" \
        --cluster-node "n$i" --database-url "$url" --lease-ttl "$ttl" \
        --data-dir "$work/n$i" >"$work/n$i.out" 2>"$work/n$i.log" &
    pids+=("$!")
done
for i in 1 2 3; do
    port=$((base_port + i))
    for _ in $(seq 1 100); do
        grep -q "listening on" "$work/n$i.out" 2>/dev/null && break
        kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { cat "$work/n$i.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "n$i: http://127.0.0.1:$port (log: $work/n$i.log)"
done
sleep 1
if command -v curl >/dev/null; then
    curl -s "http://127.0.0.1:$((base_port + 1))/cluster"
    echo
fi
echo "Ctrl-C drains the nodes and stops the database." >&2
wait
