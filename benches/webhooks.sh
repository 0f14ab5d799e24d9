#!/bin/bash
# One collab-load run against the release binary, with webhooks off or on (to the Python
# receiver of docs/webhooks.md); prints collab-load's report and the webhook counters.
# usage: benches/webhooks.sh off|on LABEL   (after cargo build --release)
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
work=${TMPDIR:-/tmp}/collab-webhooks-bench
mkdir -p "$work"
python3 - "$root/docs/webhooks.md" "$work/receiver.py" <<'PY'
import sys
page = open(sys.argv[1]).read()
start = page.index("```python\n") + len("```python\n")
open(sys.argv[2], "w").write(page[start:page.index("```", start)])
PY
mode=$1; label=$2
BIN=$root/target/release
data=$(mktemp -d "$work/data.XXXX")
head -c 32 /dev/urandom > $data.secret
extra=()
if [ "$mode" = on ]; then
  port=$((20000 + RANDOM % 20000))
  python3 "$work/receiver.py" $port $data.secret > $data.hooks.log &
  rpids=$!
  for i in $(seq 100); do grep -q ready $data.hooks.log && break; sleep 0.1; done
  extra=(--webhook-url http://127.0.0.1:$port/ --webhook-secret-file $data.secret)
fi
$BIN/collab-engine --listen 127.0.0.1:0 --shards 2 --no-pin-cores --connects-per-ip-per-second 0 --connects-per-ip-burst 0 --data-dir $data/d "${extra[@]}" > $data.out 2>$data.err &
spid=$!
for i in $(seq 50); do grep -q listening $data.out && break; sleep 0.1; done
addr=$(head -1 $data.out | sed 's|listening on http://||')
$BIN/collab-load --url ws://$addr --rooms 200 --clients-per-room 2 --edit-interval 50ms --warmup 3s --duration 15s --server-pid $spid --label "$label" --out $data.report.json > $data.load.txt 2>&1 || true
metrics=$(curl -s http://$addr/metrics | grep -E "^collab_webhook_(sent|failed|dropped)_total|^collab_ops_accepted_total" | tr '\n' ' ')
kill $spid; wait $spid 2>/dev/null || true
if [ -n "${rpids:-}" ]; then kill "$rpids"; fi
echo "== $label"; tail -25 "$data.load.txt"; echo "metrics: $metrics"
grep -m3 "webhooks:" "$data.err" || true
rm -rf "$data" "$data".*
