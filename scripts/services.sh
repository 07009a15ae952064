#!/usr/bin/env bash
# Brings up, on loopback only, the real services the tests talk to, when they are not up yet:
#   - FerretDB (a MongoDB wire-protocol server) on 127.0.0.1:${CLOUDAI_FERRETDB_PORT:-27017},
#     telemetry disabled (its default reports to a public host; nothing may leave this machine);
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

start_ferretdb() {
  if port_open "$PORT"; then
    log "a MongoDB-protocol server already listens on 127.0.0.1:$PORT"
    return
  fi
  [ -x "$FERRETDB_BIN" ] || install_ferretdb
  local data
  data="${CLOUDAI_FERRETDB_DATA:-$(mktemp -d /tmp/cloudai-ferretdb.XXXXXX)}"
  mkdir -p "$data"
  log "starting FerretDB on 127.0.0.1:$PORT (data in $data)"
  nohup "$FERRETDB_BIN" --handler=sqlite --sqlite-url="file:$data/" \
    --listen-addr="127.0.0.1:$PORT" --debug-addr=- --telemetry=disable \
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
