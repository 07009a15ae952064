#!/usr/bin/env bash
# The API's contract, checked from the outside: schemathesis (pinned in
# tests/schemathesis/requirements.txt, in a venv of its own) runs every check and every phase
# (examples, coverage, fuzzing, stateful) over every operation of the OpenAPI document that a
# real `cloudai serve` (embedded store, no local worker, on loopback) serves, with an admin
# token; configuration in tests/schemathesis/schemathesis.toml. Fails on any failure or error.
#
#   scripts/schemathesis.sh [PATH-TO-cloudai]      # default: the binary the e2e tests built
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cloudai-target}"
binary="${1:-$CARGO_TARGET_DIR/debug/cloudai-under-test}"
venv="$CARGO_TARGET_DIR/schemathesis-venv"
requirements=tests/schemathesis/requirements.txt

if [ ! -x "$venv/bin/st" ] || [ "$requirements" -nt "$venv/.installed" ]; then
  echo "[schemathesis] installing $(grep -m1 '^schemathesis==' "$requirements") into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  touch "$venv/.installed"
fi

work=$(mktemp -d /tmp/cloudai-schemathesis.XXXXXX)
log="$work/serve.log"
# Arrays capped at 5,000 tasks (the document states the cap, so generated counts stay within
# it): a debug build storing a generated 100,000-task array on a loaded 2-core machine can take
# longer than the client's 10 s timeout; throughput is the arrays bench's business, not this.
"$binary" serve --listen 127.0.0.1:0 --data-dir "$work/data" --no-local-worker \
  --max-array-tasks 5000 >"$log" 2>&1 &
serve=$!
trap 'kill "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; rm -rf "$work"' EXIT
url=
for _ in $(seq 300); do
  url=$(sed -n 's/.*listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$log" | head -1)
  [ -n "$url" ] && [ -s "$work/data/admin.token" ] && break
  kill -0 "$serve" 2>/dev/null || { echo "cloudai serve exited:"; cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "cloudai serve did not listen within 30 s:"; cat "$log"; exit 1; }
echo "[schemathesis] against $url ($("$binary" --version 2>/dev/null || echo cloudai))"
export CLOUDAI_ST_ADMIN_TOKEN CLOUDAI_ST_WORKER_ID=st-worker CLOUDAI_ST_WORKER_TOKEN
CLOUDAI_ST_ADMIN_TOKEN=$(cat "$work/data/admin.token")
# A worker of the cluster, for the agents' operations (see schemathesis.toml).
registered=$(curl -sSf -X POST "$url/v1/workers" \
  -H "Authorization: Bearer $(cat "$work/data/join.token")" -H 'Content-Type: application/json' \
  -d "{\"worker_id\": \"$CLOUDAI_ST_WORKER_ID\", \"total_cpu\": 4, \"total_memory\": 8, \"total_storage\": 10, \"total_gpu\": 0}")
CLOUDAI_ST_WORKER_TOKEN=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$registered")
# A stored policy, so that the operations on one reach past 404 (see schemathesis.toml).
component="${CLOUDAI_POLICY_WASM_DIR:-$CARGO_TARGET_DIR/policies}/best-fit.wasm"
if [ -f "$component" ]; then
  curl -sSf -o /dev/null -X POST "$url/v1/policies?name=st-policy&version=1" \
    -H "Authorization: Bearer $CLOUDAI_ST_ADMIN_TOKEN" -H 'Content-Type: application/wasm' \
    --data-binary "@$component"
else
  echo "[schemathesis] no $component (scripts/build-policies.sh): the policy operations will mostly see 404"
fi

status=0
(cd tests/schemathesis && PYTHONPATH=. "$venv/bin/st" --config-file schemathesis.toml run \
  "$url/v1/openapi.json" --workers 2 --no-color) || status=$?
if [ "$status" -ne 0 ]; then
  echo "[schemathesis] failed ($status); the host's log:"
  tail -50 "$log"
fi
exit "$status"
