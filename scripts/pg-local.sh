#!/usr/bin/env bash
# A private, throw-away PostgreSQL server for the tests and for trying `--database-url`.
#
#   scripts/pg-local.sh start [--dir DIR] [--port PORT] [--owner-pid PID] [--tls]
#       Installs PostgreSQL from Debian packages when it is missing, initialises a cluster in
#       DIR (default: a new directory under ${TMPDIR:-/tmp}) as an unprivileged user (root is
#       refused by PostgreSQL: the system user `collabpg` is created when needed), starts it
#       listening on 127.0.0.1:PORT only (default: a free port) and on a Unix socket in DIR,
#       creates the database `collab`, and prints its URL as the last line of stdout:
#           postgres://collabpg@127.0.0.1:PORT/collab
#       With --owner-pid, a watcher stops the server and removes DIR once that process exits
#       (the tests pass their own pid, so no server outlives them).
#       With --tls, the server also accepts TLS (ssl = on) with a certificate for 127.0.0.1 and
#       localhost signed by a throw-away CA made with the openssl CLI; clients verify it with
#       DIR/ca.pem (`--database-ca-file DIR/ca.pem`, URL `...?sslmode=require`). Plain
#       connections are still accepted.
#   scripts/pg-local.sh stop DIR
#       Stops the server of DIR (fast shutdown) and removes DIR.
#   scripts/pg-local.sh ctl DIR PG_CTL_ARGS...
#       Runs pg_ctl on DIR's cluster as its owner, e.g. `ctl DIR restart -m immediate`,
#       `ctl DIR stop -m fast`, `ctl DIR start` (the fault tests use it).
#   scripts/pg-local.sh pid DIR
#       Prints the postmaster's pid.
#
# Everything but the URL goes to stderr. Any failure exits non-zero with the reason and the
# end of the server log: nothing is skipped silently.
set -euo pipefail

PG_USER=collabpg
DB_NAME=collab

die() {
  echo "pg-local.sh: $*" >&2
  exit 1
}

# The newest installed server's bin directory (Debian keeps them in /usr/lib/postgresql/N/bin).
find_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
    echo "$dir"
  fi
}

ensure_installed() {
  if [ -n "$(find_bindir)" ]; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
  echo "pg-local.sh: installing PostgreSQL from Debian packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d: the package must not start its own cluster service (on port 5432) here.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  local rc=0
  { apt-get update -q && apt-get install -y -q --no-install-recommends postgresql; } >&2 || rc=$?
  if [ "$created_policy" = 1 ]; then
    rm -f "$policy"
  fi
  [ "$rc" = 0 ] || die "apt-get install postgresql failed (exit $rc)"
  [ -n "$(find_bindir)" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
}

# Runs a command as the unprivileged cluster owner (as ourselves when not root).
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

ensure_user() {
  if [ "$(id -u)" != 0 ]; then
    PG_USER=$(id -un)
    return
  fi
  if ! id -u "$PG_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_USER" \
      || die "could not create the system user $PG_USER"
  fi
}

# A TCP port nobody listens on, from the ephemeral-looking range but below it.
pick_port() {
  local port tries=0
  while [ "$tries" -lt 50 ]; do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
    tries=$((tries + 1))
  done
  die "no free port found"
}

start() {
  local dir="" port="" owner_pid="" tls=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --dir) dir=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --owner-pid) owner_pid=$2; shift 2 ;;
      --tls) tls=1; shift ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  ensure_installed
  ensure_user
  local bindir
  bindir=$(find_bindir)
  if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/collab-pg.XXXXXX")
  else
    mkdir -p "$dir"
  fi
  dir=$(cd "$dir" && pwd)
  [ -z "$(ls -A "$dir")" ] || die "$dir is not empty"
  # The owner must be able to reach the directory through its parents.
  chmod 755 "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown "$PG_USER" "$dir"
  fi
  as_owner test -w "$dir" \
    || die "$dir is not reachable by the user $PG_USER (a parent directory without o+x?); use a directory under /tmp"
  mkdir -p "$dir/data"
  [ "$(id -u)" != 0 ] || chown "$PG_USER" "$dir/data"
  chmod 700 "$dir/data"
  # trust on 127.0.0.1 and the socket only: the server listens nowhere else.
  as_owner "$bindir/initdb" -D "$dir/data" -U "$PG_USER" -E UTF8 --locale=C.UTF-8 \
    --auth=trust --data-checksums >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed in $dir/data"; }
  local ssl_conf=""
  if [ "$tls" = 1 ]; then
    make_certs "$dir"
    ssl_conf="ssl = on
ssl_cert_file = '$dir/data/server.crt'
ssl_key_file = '$dir/data/server.key'"
  fi
  local attempt=0 chosen
  while :; do
    chosen=${port:-$(pick_port)}
    # In the configuration file, so that a plain `pg_ctl start` (ctl) finds them again.
    as_owner tee "$dir/data/collab-local.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
port = $chosen
unix_socket_directories = '$dir'
$ssl_conf
CONF
    grep -q "^include_if_exists = 'collab-local.conf'" "$dir/data/postgresql.conf" \
      || echo "include_if_exists = 'collab-local.conf'" | as_owner tee -a "$dir/data/postgresql.conf" >/dev/null
    if as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >&2; then
      break
    fi
    attempt=$((attempt + 1))
    if [ -n "$port" ] || [ "$attempt" -ge 3 ]; then
      tail -n 30 "$dir/server.log" >&2 || true
      die "the server did not start (port $chosen); log: $dir/server.log"
    fi
  done
  echo "$chosen" >"$dir/port"
  as_owner "$bindir/psql" -q -X -v ON_ERROR_STOP=1 -h "$dir" -p "$chosen" -d postgres \
    -c "CREATE DATABASE $DB_NAME" >&2 \
    || { stop_dir "$dir"; die "could not create the database $DB_NAME"; }
  if [ -n "$owner_pid" ]; then
    # Detached from our stdout, so whoever reads the URL is not kept waiting for the watcher.
    nohup "$0" watch "$dir" "$owner_pid" </dev/null >/dev/null 2>&1 &
  fi
  echo "pg-local.sh: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') running in $dir" \
    "(stop it with: $0 stop $dir)" >&2
  if [ "$tls" = 1 ]; then
    echo "pg-local.sh: TLS on; CA certificate: $dir/ca.pem" >&2
  fi
  echo "postgres://$PG_USER@127.0.0.1:$chosen/$DB_NAME"
}

# A throw-away CA (DIR/ca.pem, its key DIR/ca.key) and a server certificate it signs for
# 127.0.0.1 and localhost (DIR/data/server.crt and .key, owned by the cluster owner, mode 0600
# as PostgreSQL demands).
make_certs() {
  local dir=$1
  # Debian's postgresql depends on it (through ssl-cert), but a server installed otherwise may not.
  if ! command -v openssl >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "pg-local.sh: installing openssl from Debian packages" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl; }; } >&2 \
      || die "apt-get install openssl failed"
  fi
  command -v openssl >/dev/null || die "--tls needs the openssl command (apt-get install openssl)"
  local log="$dir/openssl.log"
  {
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
      -keyout "$dir/ca.key" -out "$dir/ca.pem" -days 2 -subj "/CN=collab-engine test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" &&
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
      -keyout "$dir/data/server.key" -out "$dir/server.csr" -subj "/CN=127.0.0.1" &&
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$dir/server.ext" &&
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/data/server.crt"
  } >"$log" 2>&1 || { cat "$log" >&2; die "making the TLS certificates failed"; }
  chmod 600 "$dir/data/server.key" "$dir/ca.key"
  chmod 644 "$dir/ca.pem" "$dir/data/server.crt"
  if [ "$(id -u)" = 0 ]; then
    chown "$PG_USER" "$dir/data/server.key" "$dir/data/server.crt"
  fi
}

stop_dir() {
  local dir=$1 bindir
  bindir=$(find_bindir)
  [ -n "$bindir" ] || die "PostgreSQL is not installed"
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2 \
      || as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 \
      || die "could not stop the server in $dir"
  fi
  # Only ever a directory this script created: it holds our cluster.
  if [ -d "$dir/data" ] && [ -f "$dir/port" ]; then
    rm -rf "$dir"
  fi
}

stop() {
  [ $# -eq 1 ] || die "usage: $0 stop DIR"
  [ -d "$1" ] || die "stop: $1 is not a directory"
  ensure_user
  stop_dir "$(cd "$1" && pwd)"
}

ctl() {
  [ $# -ge 2 ] || die "usage: $0 ctl DIR PG_CTL_ARGS..."
  local dir=$1 bindir
  shift
  [ -d "$dir/data" ] || die "ctl: no cluster in $dir"
  ensure_user
  bindir=$(find_bindir)
  as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 "$@" >&2
}

watch() {
  local dir=$1 owner_pid=$2
  while kill -0 "$owner_pid" 2>/dev/null; do
    sleep 1
  done
  ensure_user
  stop_dir "$dir"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  ctl) shift; ctl "$@" ;;
  pid) [ -f "${2:-}/data/postmaster.pid" ] || die "pid: no running server in ${2:-?}"; head -n 1 "$2/data/postmaster.pid" ;;
  watch) shift; watch "$@" ;;
  *) die "usage: $0 start [--dir DIR] [--port PORT] [--owner-pid PID] [--tls] | stop DIR | ctl DIR ARGS... | pid DIR" ;;
esac
