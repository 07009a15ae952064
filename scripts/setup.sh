#!/usr/bin/env bash
# Installs what the tests need and this machine lacks, from the package registries only (apt,
# rustup): the Docker engine, PostgreSQL (FerretDB's storage), Chromium (the dashboard's
# browser tests), busybox-static (the executor's test image), Node/npm and a Python venv (the
# example policies), the wasm32-wasip2 target, rustfmt and clippy. Says what it installs and how
# long it took; installs nothing that is already there. apt needs root: run as root, or install
# the packages it names yourself.
set -euo pipefail

started=$(date +%s)
need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v python3 >/dev/null || need_apt+=(python3)
# The example policies in JavaScript and Python (scripts/build-example-policies.sh): npm and
# a Python venv, their toolchains then come from the npm and PyPI registries.
command -v npm >/dev/null || need_apt+=(nodejs npm)
# The dashboard's browser tests drive Debian's Chromium (tests/browser; no browser download).
command -v chromium >/dev/null || need_apt+=(chromium)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# The executor's tests build their image FROM scratch around this statically linked binary.
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
# FerretDB's storage in the tests (scripts/services.sh says why not SQLite).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "[setup] missing: ${need_apt[*]}; run as root, or: sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  echo "[setup] apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need_apt[@]}"
else
  echo "[setup] system packages: all present"
fi

need_rust=()
for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || need_rust+=("$component")
done
if [ ${#need_rust[@]} -gt 0 ]; then
  echo "[setup] rustup component add ${need_rust[*]}"
  rustup component add "${need_rust[@]}"
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "[setup] rustup target add wasm32-wasip2"
  rustup target add wasm32-wasip2
fi
echo "[setup] done in $(( $(date +%s) - started )) s"
