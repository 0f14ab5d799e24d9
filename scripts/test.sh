#!/usr/bin/env bash
# The project's one test command: formatting, lints, every Rust test, the check that the
# checked-in demo bundle is a fresh build, then the JavaScript and browser tests. Exits non-zero on the first failure.
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

echo "== the demo bundle matches a fresh build (clients/demo/build.sh --check)"
clients/demo/build.sh --check

if [ -x tests/browser/run.sh ] && [ "${SKIP_BROWSER_TESTS:-0}" != "1" ]; then
  echo "== JavaScript client and browser tests (tests/browser/run.sh)"
  tests/browser/run.sh
fi
