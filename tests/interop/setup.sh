#!/usr/bin/env bash
# Installs what the interop tests (tests/it/interop.rs) need: the Python `websockets` package and
# the Node `ws` package (into tests/interop/node_modules). Safe to run again; each step is skipped
# when its tool is already there.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c "import websockets.sync.client" 2>/dev/null; then
  python3 -m pip install --quiet "websockets>=12"
fi
if ! node -e "require('ws')" 2>/dev/null; then
  npm install --no-audit --no-fund --silent
fi
