#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzingclient against a freshly built
# release examples/echo_server (the shards' connection layer with an echo handler) on 127.0.0.1,
# then checks every report. Every case but 12.* and 13.* (permessage-deflate, which the server
# does not offer; excluded from the spec, so they do not run) must be OK or NON-STRICT
# (INFORMATIONAL where the suite says a case is informational), and every connection must end
# in a clean close. Otherwise it exits 1 and lists the failing cases.
#
# The suite runs on Python 2.7 only. This script finds one, in this order:
#   1. $AUTOBAHN_PYTHON2, when set: a python2.7 executable, or `debian` to force step 4;
#   2. a pyenv build, ${PYENV_ROOT:-~/.pyenv}/versions/2.7.*/bin/python2.7;
#   3. a working python2.7 on PATH;
#   4. Debian 11's python2.7 packages, fetched with apt-get download from the Debian mirror that
#      this machine's apt already uses (a private sources list and cache under target/autobahn/apt,
#      nothing installed system-wide) and unpacked with dpkg -x into target/autobahn/debian11/.
# When none works it fails (it never skips). Python packages go into a private virtualenv,
# target/autobahn/venv/, from tests/autobahn/requirements.txt (every version pinned); it is
# reused while the requirements and the interpreter stay the same.
#
# Environment: AUTOBAHN_PYTHON2 (above); AUTOBAHN_CASES, a JSON list of case patterns to run
# instead of every case (e.g. '["5.*","7.*"]'; then the case-count check is off);
# AUTOBAHN_SERVER_ARGS, extra echo_server flags (e.g. `--small-sndbuf --shards 1`).
# Reports: target/autobahn/reports/ (index.html to browse). Needs python3 with pip, gcc, and for
# step 4 apt-get and dpkg.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
WORK="$ROOT/target/autobahn"
REQUIREMENTS="$ROOT/tests/autobahn/requirements.txt"
# virtualenv 16.7 is the last that runs on Python 2.7 itself and carries pip 20.3.4 (the last pip
# for 2.7) and setuptools 44, so it needs nothing but the interpreter.
VIRTUALENV_VERSION=16.7.12
# Cases of autobahntestsuite 0.8.2 outside 12.* and 13.*: a run that reports fewer skipped some.
EXPECTED_CASES=301
mkdir -p "$WORK"

fail() {
  echo "autobahn: $*" >&2
  exit 1
}

# Whether "$@" runs a CPython 2.7.
is_python27() {
  "$@" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1
}

# Fetches Debian 11's python2.7 (with the headers the suite's C extensions build against, and
# the libssl and libffi it was built with, which Debian 12 no longer has) into $WORK/debian11.
debian_python27() {
  local prefix="$WORK/debian11" apt="$WORK/apt"
  if [ -x "$prefix/usr/bin/python2.7" ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    fail "no Python 2.7 here, and no apt-get/dpkg to fetch Debian 11's"
  fi
  # The mirror of this machine's own Debian sources, as apt sees them: the URI of the suite
  # named like this release, and of its -security suite.
  local codename targets main security
  # shellcheck disable=SC1091
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  # shellcheck disable=SC2016
  targets="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages')"
  main="$(awk -v r="$codename" '$2 == r { print $1; exit }' <<<"$targets")"
  security="$(awk -v r="$codename-security" '$2 == r { print $1; exit }' <<<"$targets")"
  [ -n "$main" ] || fail "no Python 2.7 here, and no Debian mirror in apt's sources to fetch Debian 11's"
  echo "== fetching Debian 11's python2.7 packages from $main (apt-get download, private cache)"
  rm -rf "$apt" "$prefix.tmp"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/parts" "$apt/prefs" "$apt/debs"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  {
    echo "deb [signed-by=$keyring] $main bullseye main"
    if [ -n "$security" ]; then
      echo "deb [signed-by=$keyring] $security bullseye-security main"
    fi
  } >"$apt/sources.list"
  local opts=(
    -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts"
    -o "Dir::Etc::PreferencesParts=$apt/prefs" -o "Dir::State::Lists=$apt/lists"
    -o "Dir::Cache=$apt/cache" -o "APT::Sandbox::User=$(id -un)"
  )
  apt-get "${opts[@]}" -qq update || fail "apt-get update of Debian 11's sources failed"
  (cd "$apt/debs" && apt-get "${opts[@]}" -qq download \
    python2.7 python2.7-minimal libpython2.7 libpython2.7-minimal libpython2.7-stdlib \
    libpython2.7-dev libssl1.1 libffi7) || fail "apt-get download of Debian 11's python2.7 failed"
  mkdir -p "$prefix.tmp"
  local deb
  for deb in "$apt/debs"/*.deb; do
    dpkg -x "$deb" "$prefix.tmp"
  done
  mv "$prefix.tmp" "$prefix"
}

# Sets PY2 (the interpreter command) and, for the unpacked Debian one, the environment it needs.
find_python27() {
  PY2=""
  local candidate
  case "${AUTOBAHN_PYTHON2:-}" in
    "") ;;
    debian) ;;
    *)
      is_python27 "$AUTOBAHN_PYTHON2" || fail "AUTOBAHN_PYTHON2=$AUTOBAHN_PYTHON2 is not a working Python 2.7"
      PY2="$AUTOBAHN_PYTHON2"
      return 0
      ;;
  esac
  if [ "${AUTOBAHN_PYTHON2:-}" != debian ]; then
    for candidate in "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/2.7.*/bin/python2.7 python2.7; do
      if is_python27 "$candidate"; then
        PY2="$(command -v "$candidate")"
        return 0
      fi
    done
  fi
  debian_python27
  local prefix="$WORK/debian11" libdir
  libdir="$(find "$prefix/usr/lib" -maxdepth 1 -type d -name '*-linux-gnu*' | head -n 1)"
  [ -n "$libdir" ] || fail "Debian 11's python2.7 unpacked without its library folder"
  # The unpacked libssl1.1 and libffi7 for its extension modules; its pyconfig.h lives under
  # the multiarch include folder, which the compiler only finds with -I.
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CFLAGS="-I$prefix/usr/include${CFLAGS:+ $CFLAGS}"
  DEBIAN_PYTHONHOME="$prefix/usr"
  PY2="$prefix/usr/bin/python2.7"
  PYTHONHOME="$DEBIAN_PYTHONHOME" is_python27 "$PY2" || fail "Debian 11's python2.7 does not run here"
}

DEBIAN_PYTHONHOME=""
find_python27
echo "== Python 2.7: $PY2"

# The virtualenv, rebuilt when the requirements or the interpreter change.
VENV="$WORK/venv"
STAMP="$(sha256sum <"$REQUIREMENTS" | cut -c1-16) $PY2 $VIRTUALENV_VERSION"
if [ ! -x "$VENV/bin/wstest" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "== virtualenv $VENV (tests/autobahn/requirements.txt)"
  rm -rf "$VENV" "$WORK/virtualenv"
  python3 -m pip download --quiet --no-deps --only-binary :all: \
    "virtualenv==$VIRTUALENV_VERSION" -d "$WORK/virtualenv" ||
    fail "could not download virtualenv $VIRTUALENV_VERSION with python3 -m pip"
  python3 -m zipfile -e "$WORK/virtualenv/virtualenv-$VIRTUALENV_VERSION-py2.py3-none-any.whl" \
    "$WORK/virtualenv/unpacked"
  # --no-download: seed pip and setuptools from the wheels inside virtualenv itself.
  if [ -n "$DEBIAN_PYTHONHOME" ]; then
    # PYTHONHOME only while virtualenv copies the interpreter; the virtualenv's own python
    # finds its prefix without it (virtualenv's warning about it does not apply).
    PYTHONHOME="$DEBIAN_PYTHONHOME" "$PY2" "$WORK/virtualenv/unpacked/virtualenv.py" \
      --quiet --no-download "$VENV" | grep -v 'PYTHONHOME is set' ||
      [ "${PIPESTATUS[0]}" = 0 ] || fail "virtualenv failed"
  else
    "$PY2" "$WORK/virtualenv/unpacked/virtualenv.py" --quiet --no-download "$VENV" ||
      fail "virtualenv failed"
  fi
  "$VENV/bin/python" -m pip install --quiet --no-warn-script-location --no-deps \
    -r "$REQUIREMENTS" 2> >(grep -v -e DEPRECATION -e CryptographyDeprecationWarning >&2) ||
    fail "pip install -r tests/autobahn/requirements.txt failed"
  # The pins must be the whole closure: --no-deps brought nothing else in.
  "$VENV/bin/python" -m pip check 2> >(grep -v DEPRECATION >&2) ||
    fail "tests/autobahn/requirements.txt is missing a dependency (pip check)"
  echo "$STAMP" >"$VENV/.stamp"
fi

echo "== cargo build --release --example echo_server"
cargo build --release --quiet --example echo_server

REPORTS="$WORK/reports"
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
SERVER_LOG="$WORK/echo_server.log"
# Autobahn's 9.* cases send messages of up to 16 MiB.
# shellcheck disable=SC2086
"$ROOT/target/release/examples/echo_server" --listen 127.0.0.1:0 \
  --max-message-bytes $((16 * 1024 * 1024)) ${AUTOBAHN_SERVER_ARGS:-} >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap stop_server EXIT
ADDR=""
for _ in $(seq 1 100); do
  ADDR="$(sed -n 's|^listening on http://||p' "$SERVER_LOG" | head -n 1)"
  [ -n "$ADDR" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "echo_server exited: $(cat "$SERVER_LOG")"
  sleep 0.1
done
[ -n "$ADDR" ] || fail "echo_server did not say where it listens: $(cat "$SERVER_LOG")"
echo "== echo_server on $ADDR (log: $SERVER_LOG)"

CASES="${AUTOBAHN_CASES:-[\"*\"]}"
cat >"$WORK/fuzzingclient.json" <<EOF
{
  "outdir": "$REPORTS",
  "servers": [{"agent": "echo_server", "url": "ws://$ADDR/ws"}],
  "cases": $CASES,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
echo "== wstest -m fuzzingclient (cases $CASES but 12.* and 13.*; output: $WORK/wstest.log)"
START=$(date +%s)
# A bound on the whole run: it takes well under a minute on a quiet machine.
if ! (cd "$WORK" && timeout 900 "$VENV/bin/wstest" -m fuzzingclient -s "$WORK/fuzzingclient.json") \
  >"$WORK/wstest.log" 2>&1; then
  tail -n 20 "$WORK/wstest.log" >&2
  fail "wstest failed or timed out"
fi
echo "== wstest took $(($(date +%s) - START)) s"
kill -0 "$SERVER_PID" 2>/dev/null || fail "echo_server died during the run: $(tail -n 20 "$SERVER_LOG")"
kill "$SERVER_PID"
SERVER_RC=0
wait "$SERVER_PID" || SERVER_RC=$?
[ "$SERVER_RC" = 0 ] || fail "echo_server exited with $SERVER_RC on SIGTERM: $(tail -n 20 "$SERVER_LOG")"

EXPECTED="$EXPECTED_CASES"
[ -z "${AUTOBAHN_CASES:-}" ] || EXPECTED=""
python3 - "$REPORTS" "$EXPECTED" <<'EOF'
"""Checks the fuzzingclient's reports: prints counts per result, lists failing cases."""
import collections
import json
import os
import sys

reports, expected = sys.argv[1], sys.argv[2]
with open(os.path.join(reports, "index.json")) as f:
    index = json.load(f)
cases = index.get("echo_server", {})
counts = collections.Counter()
failing = []
# Results the contract accepts; the suite marks a case INFORMATIONAL only where the RFC leaves
# the behaviour open, and NON-STRICT where it is allowed but not the strictest (e.g. failing on
# invalid UTF-8 at the end of a frame rather than at the first bad byte).
good = {"OK", "NON-STRICT", "INFORMATIONAL"}
good_close = {"OK", "INFORMATIONAL"}


def case_key(case_id):
    return [int(part) for part in case_id.split(".")]


for case_id in sorted(cases, key=case_key):
    summary = cases[case_id]
    with open(os.path.join(reports, summary["reportfile"])) as f:
        report = json.load(f)
    counts[summary["behavior"]] += 1
    problems = []
    if case_id.split(".")[0] in ("12", "13"):
        problems.append("a permessage-deflate case ran")
    if summary["behavior"] not in good:
        problems.append("behavior %s" % summary["behavior"])
    if summary["behaviorClose"] not in good_close:
        problems.append("close %s" % summary["behaviorClose"])
    if not report.get("wasClean"):
        problems.append("unclean close (%s)" % report.get("wasNotCleanReason"))
    if problems:
        failing.append("%s: %s; %s" % (case_id, ", ".join(problems), report.get("description", "")[:120]))
print("autobahn: %d cases: %s" % (len(cases), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
if expected and len(cases) != int(expected):
    failing.append("%d cases reported, expected %s" % (len(cases), expected))
if not cases:
    failing.append("no case ran")
if failing:
    print("autobahn: FAILED (reports: %s)" % reports)
    for line in failing:
        print("  " + line)
    sys.exit(1)
print("autobahn: every case OK, NON-STRICT or INFORMATIONAL, every close clean")
EOF
