#!/usr/bin/env bash
# The project's one test command: formatting, lints, every Rust test, then the JavaScript and
# browser tests. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== installing the interop clients when missing (tests/interop/setup.sh)"
tests/interop/setup.sh

echo "== starting a private PostgreSQL for the storage tests (scripts/pg-local.sh)"
# One server for every test binary; its watcher stops it when this script exits.
COLLAB_TEST_DATABASE_URL=$(scripts/pg-local.sh start --owner-pid $$)
export COLLAB_TEST_DATABASE_URL

echo "== cargo test"
cargo test

echo "== cargo test --test it on PostgreSQL (COLLAB_IT_POSTGRES=1)"
COLLAB_IT_POSTGRES=1 cargo test --test it

if [ -x tests/browser/run.sh ] && [ "${SKIP_BROWSER_TESTS:-0}" != "1" ]; then
  echo "== JavaScript client and browser tests (tests/browser/run.sh)"
  tests/browser/run.sh
fi
