#!/usr/bin/env bash
# Runs the JavaScript client's tests: the replica (traces, Rust fixture), the connection logic,
# and the end-to-end tests in headless Chromium against the release server binary.
# Installs what is missing: Chromium (Debian package) and the npm packages (npm ci).
# Exits non-zero on failure; prints node's test summary.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
  echo "== installing chromium (apt)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

cd "$HERE"
if [ ! -d node_modules/playwright-core ] || [ ! -d node_modules/ws ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "== npm ci (tests/browser)"
  npm ci --no-audit --no-fund --loglevel=error
fi

echo "== cargo build --release (server binary, Rust participant of the mixed test)"
(cd "$REPO" && cargo build --release --bin collab-engine --example mixed_client)

echo "== node --test (tests/browser/test)"
# Screenshots and logs: target/browser-test/
exec node --test --test-concurrency=1 --test-reporter=spec test/
