#!/usr/bin/env bash
# Checks the systemd units under deploy/ with `systemd-analyze verify`, their ExecStart pointed
# at the cloudai binary given (verify requires the executable to exist), and checks that every
# CLOUDAI_* variable they set is one the binary reads.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:?usage: scripts/check-units.sh PATH-TO-cloudai}"
if ! command -v systemd-analyze >/dev/null; then
  echo "[units] systemd-analyze not installed: skipped" >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in deploy/*.service; do
  sed "s|/usr/local/bin/cloudai|$bin|" "$unit" >"$tmp/$(basename "$unit")"
done
# verify exits 0 on what it ignores (an unknown key, a bad value): anything it says fails.
said=$(systemd-analyze verify "$tmp"/*.service 2>&1) || { echo "$said" >&2; exit 1; }
[ -z "$said" ] || { echo "[units] systemd-analyze verify: $said" >&2; exit 1; }
help="$("$bin" serve --help) $("$bin" worker --help)"
for var in $(grep -ho 'Environment=CLOUDAI_[A-Z_]*' deploy/*.service | cut -d= -f2 | sort -u); do
  grep -qw -- "$var" <<<"$help" || { echo "[units] $var is not read by cloudai" >&2; exit 1; }
done
echo "[units] deploy/*.service verified"
