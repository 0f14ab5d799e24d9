#!/usr/bin/env bash
# The project's one test command: formatting, lints, every Rust test, the Python client's tests,
# the WebSocket conformance run (Autobahn|Testsuite against examples/echo_server), the check that
# the checked-in demo bundle is a fresh build, then the JavaScript and browser tests. Exits
# non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

echo "== installing the interop clients and the Python venv when missing (tests/interop/setup.sh)"
tests/interop/setup.sh

echo "== starting a private PostgreSQL for the storage tests (scripts/pg-local.sh)"
# One server for every test binary; its watcher stops it when this script exits.
COLLAB_TEST_DATABASE_URL=$(scripts/pg-local.sh start --owner-pid $$)
export COLLAB_TEST_DATABASE_URL

echo "== cargo test"
# The setup above installed every interop tool, so a missing one is a failure, not a skip.
COLLAB_REQUIRE_INTEROP=1 cargo test

echo "== Python client tests (pytest clients/python/tests, in target/venv, against the release binary)"
cargo build --release --bin collab-engine --example mixed_client
VENV_PYTHON="$(scripts/python-venv.sh | tail -n 1)"
# The package promises Python 3.9+: install it into a 3.9 venv and import it, when this machine
# has a Python 3.9 (PYTHON39, or pyenv's); a machine without one leaves the check out, saying so.
PY39="${PYTHON39:-$(ls -1 "$HOME"/.pyenv/versions/3.9.*/bin/python 2>/dev/null | tail -n 1)}"
if [ -n "$PY39" ]; then
  VENV39_PYTHON="$(PYTHON="$PY39" COLLAB_VENV="${CARGO_TARGET_DIR:-target}/venv39" scripts/python-venv.sh | tail -n 1)"
  "$VENV39_PYTHON" -W error -c "import collab_engine_client, sys; assert sys.version_info[:2] == (3, 9)"
else
  echo "(no Python 3.9 on this machine: the 3.9 install-and-import check of clients/python is left out)"
fi
# Any non-zero pytest exit fails the run, 5 (no tests collected) included: set -e, no exceptions.
"$VENV_PYTHON" -m pytest -q -p no:cacheprovider clients/python/tests

echo "== WebSocket conformance: Autobahn|Testsuite against examples/echo_server (tests/autobahn/run.sh)"
tests/autobahn/run.sh

echo "== the demo bundle matches a fresh build (clients/demo/build.sh --check)"
clients/demo/build.sh --check

echo "== cargo test --test it on PostgreSQL (COLLAB_IT_POSTGRES=1)"
# The cluster tests always run on PostgreSQL; they ran in the first pass.
COLLAB_IT_POSTGRES=1 cargo test --test it -- --skip cluster::

if [ -x tests/browser/run.sh ] && [ "${SKIP_BROWSER_TESTS:-0}" != "1" ]; then
  echo "== JavaScript client and browser tests (tests/browser/run.sh)"
  tests/browser/run.sh
fi
