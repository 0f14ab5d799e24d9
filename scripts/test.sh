#!/usr/bin/env bash
# The project's one test command: formatting, lints, every Rust test, the Python client's tests,
# then the JavaScript and browser tests. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== installing the interop clients and the Python venv when missing (tests/interop/setup.sh)"
tests/interop/setup.sh

echo "== cargo test"
# The setup above installed every interop tool, so a missing one is a failure, not a skip.
COLLAB_REQUIRE_INTEROP=1 cargo test

echo "== Python client tests (pytest clients/python/tests, in target/venv, against the release binary)"
cargo build --release --bin collab-engine --example mixed_client
VENV_PYTHON="$(scripts/python-venv.sh | tail -n 1)"
# Any non-zero pytest exit fails the run, 5 (no tests collected) included: set -e, no exceptions.
"$VENV_PYTHON" -m pytest -q -p no:cacheprovider clients/python/tests

if [ -x tests/browser/run.sh ] && [ "${SKIP_BROWSER_TESTS:-0}" != "1" ]; then
  echo "== JavaScript client and browser tests (tests/browser/run.sh)"
  tests/browser/run.sh
fi
