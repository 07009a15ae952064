#!/usr/bin/env bash
# Brings up, on loopback only, the real services the tests talk to, when they are not up yet:
#   - FerretDB (a MongoDB wire-protocol server) on 127.0.0.1:${CLOUDAI_FERRETDB_PORT:-27017},
#     telemetry disabled (its default reports to a public host; nothing may leave this machine),
#     on PostgreSQL (Debian's `postgresql`, a private cluster on a Unix socket, no TCP) when it
#     is installed, else on SQLite. Why PostgreSQL: FerretDB's SQLite backend filters every
#     query but one on `_id` in Go after reading the whole collection (a lookup by `task_id`
#     among 10,000 tasks took 510 ms; on PostgreSQL 5.5 ms), which makes multi-replica runs
#     with thousands of tasks impossible. CLOUDAI_FERRETDB_BACKEND=sqlite|postgresql forces one;
#   - the Docker engine (dockerd without a bridge network, iptables or IP forwarding).
# Installs FerretDB with Go when it is missing. Source it or run it; it is idempotent.
# Prints the MongoDB URI for the tests as: export CLOUDAI_TEST_MONGODB_URI=...
set -euo pipefail

FERRETDB_VERSION=v1.24.2
PORT="${CLOUDAI_FERRETDB_PORT:-27017}"
CACHE="${CLOUDAI_CACHE_DIR:-/var/tmp/cloudai-cache}"
FERRETDB_BIN="$CACHE/ferretdb-$FERRETDB_VERSION"
mkdir -p "$CACHE"

log() { echo "[services] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_ferretdb() {
  command -v go >/dev/null || { log "Go is required to build FerretDB"; exit 1; }
  log "building FerretDB $FERRETDB_VERSION with Go (once; cached in $FERRETDB_BIN)"
  local dir src
  dir=$(go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  src=$(mktemp -d)
  cp -r "$dir/." "$src/"
  chmod -R u+w "$src"
  # The module as published lacks build/version/version.txt, which FerretDB's version
  # package requires at start-up (it panics otherwise); `bin/task gen-version` would write it.
  echo "$FERRETDB_VERSION" > "$src/build/version/version.txt"
  # -checklinkname=0: its pinned modernc.org/libc uses linknames newer Go refuses by default.
  (cd "$src" && go build -ldflags=-checklinkname=0 -o "$FERRETDB_BIN.tmp" ./cmd/ferretdb)
  mv "$FERRETDB_BIN.tmp" "$FERRETDB_BIN"
  rm -rf "$src"
}

# The newest installed PostgreSQL's bin directory, or nothing.
postgres_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$dir" ] && [ -x "$dir/postgres" ] && echo "$dir"
}

# Runs a command as the owner of PostgreSQL's files (initdb and postgres refuse root).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A throw-away cluster for the tests in $1/pg, reachable only through a Unix socket in
# $1/pg-socket; durability off (fsync, synchronous commit): it holds test data only.
start_postgres() {
  local data=$1 bin=$2
  mkdir -p "$data/pg" "$data/pg-socket"
  [ "$(id -u)" = 0 ] && chown postgres "$data/pg" "$data/pg-socket"
  as_postgres "$bin/initdb" -D "$data/pg" -A trust -U postgres >"$data/initdb.log" 2>&1 \
    || { log "initdb failed:"; cat "$data/initdb.log" >&2; exit 1; }
  as_postgres "$bin/pg_ctl" -D "$data/pg" -l "$data/pg/postgres.log" -w -t 60 \
    -o "-c listen_addresses= -k $data/pg-socket -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null \
    || { log "PostgreSQL did not start:"; cat "$data/pg/postgres.log" >&2; exit 1; }
  as_postgres "$bin/createdb" -h "$data/pg-socket" -U postgres ferretdb
}

start_ferretdb() {
  if port_open "$PORT"; then
    log "a MongoDB-protocol server already listens on 127.0.0.1:$PORT"
    return
  fi
  [ -x "$FERRETDB_BIN" ] || install_ferretdb
  local data backend pgbin
  data="${CLOUDAI_FERRETDB_DATA:-$(mktemp -d /tmp/cloudai-ferretdb.XXXXXX)}"
  mkdir -p "$data"
  chmod 755 "$data"
  pgbin=$(postgres_bin || true)
  backend="${CLOUDAI_FERRETDB_BACKEND:-$([ -n "$pgbin" ] && echo postgresql || echo sqlite)}"
  local handler=(--handler=sqlite --sqlite-url="file:$data/")
  if [ "$backend" = postgresql ]; then
    [ -n "$pgbin" ] || { log "CLOUDAI_FERRETDB_BACKEND=postgresql but PostgreSQL is not installed"; exit 1; }
    log "starting PostgreSQL ($pgbin) for FerretDB, on a Unix socket in $data/pg-socket"
    start_postgres "$data" "$pgbin"
    handler=(--handler=postgresql
      --postgresql-url="postgres://postgres@/ferretdb?host=$data/pg-socket")
  else
    log "FerretDB on SQLite (slow for large collections: install postgresql for speed)"
  fi
  log "starting FerretDB on 127.0.0.1:$PORT (data in $data)"
  nohup "$FERRETDB_BIN" "${handler[@]}" \
    --listen-addr="127.0.0.1:$PORT" --debug-addr=- --telemetry=disable \
    --state-dir="$data" \
    --test-telemetry-url=http://127.0.0.1:9/ \
    >"$data/ferretdb.log" 2>&1 &
  for _ in $(seq 1 100); do
    port_open "$PORT" && { log "FerretDB is up"; return; }
    sleep 0.1
  done
  log "FerretDB did not start; its log:"; cat "$data/ferretdb.log" >&2; exit 1
}

start_docker() {
  if docker info >/dev/null 2>&1; then
    log "Docker engine already running"
    return
  fi
  if ! command -v dockerd >/dev/null; then
    log "no Docker engine (dockerd) installed: install Debian's docker.io (.ci/run does)"
    return
  fi
  log "starting dockerd (no bridge, no iptables, no IP forwarding)"
  nohup dockerd --bridge=none --iptables=false --ip-forward=false >/tmp/cloudai-dockerd.log 2>&1 &
  for _ in $(seq 1 150); do
    docker info >/dev/null 2>&1 && { log "Docker engine is up"; return; }
    sleep 0.2
  done
  log "dockerd did not start; its log:"; tail -50 /tmp/cloudai-dockerd.log >&2; exit 1
}

start_ferretdb
start_docker
echo "export CLOUDAI_TEST_MONGODB_URI=mongodb://127.0.0.1:$PORT/"
