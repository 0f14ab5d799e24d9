#!/usr/bin/env bash
# The project's one test command: formatting, lints, every Rust test, the WebSocket conformance
# run (Autobahn|Testsuite against examples/echo_server), then the JavaScript and browser tests.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== installing the interop clients when missing (tests/interop/setup.sh)"
tests/interop/setup.sh

echo "== cargo test"
cargo test

echo "== WebSocket conformance: Autobahn|Testsuite against examples/echo_server (tests/autobahn/run.sh)"
tests/autobahn/run.sh

if [ -x tests/browser/run.sh ] && [ "${SKIP_BROWSER_TESTS:-0}" != "1" ]; then
  echo "== JavaScript client and browser tests (tests/browser/run.sh)"
  tests/browser/run.sh
fi
