#!/usr/bin/env bash
# Builds the demo bundle: clients/demo/dist/app.js (src/main.js + the CodeMirror binding + the
# JS client + CodeMirror, one ES module the server embeds) and clients/demo/THIRD_PARTY.md.
#   clients/demo/build.sh          rebuild both (commit them)
#   clients/demo/build.sh --check  build into a temp dir and fail if the checked-in files differ
# Installs the pinned npm packages (npm ci) when they are missing or stale.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"

if [ ! -d node_modules/esbuild ] || [ ! -d node_modules/@codemirror/view ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "== npm ci (clients/demo)"
  npm ci --no-audit --no-fund --loglevel=error
fi

if [ "${1:-}" = "--check" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  node build.mjs "$tmp"
  status=0
  for f in app.js THIRD_PARTY.md; do
    checked_in="dist/app.js"
    [ "$f" = THIRD_PARTY.md ] && checked_in="THIRD_PARTY.md"
    if ! cmp -s "$tmp/$f" "$checked_in"; then
      echo "clients/demo/$checked_in differs from a fresh build: run clients/demo/build.sh and commit the result" >&2
      diff <(fold -w 200 "$checked_in") <(fold -w 200 "$tmp/$f") | head -20 >&2 || true
      status=1
    fi
  done
  [ "$status" = 0 ] && echo "clients/demo: dist/app.js and THIRD_PARTY.md match a fresh build"
  exit "$status"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
node build.mjs "$tmp"
mkdir -p dist
cp "$tmp/app.js" dist/app.js
cp "$tmp/THIRD_PARTY.md" THIRD_PARTY.md
echo "wrote clients/demo/dist/app.js ($(wc -c < dist/app.js) bytes) and clients/demo/THIRD_PARTY.md"
