#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need when absent (scripts/setup.sh: apt
# packages as root, rustup targets and components), brings up the services the tests need (FerretDB, Docker) when
# absent, builds the policy components the policy tests load (the Rust guests, then the
# JavaScript and Python examples), installs the browser tests' packages, then formatting, lints,
# every test of the workspace (host, end-to-end with the dashboard in Chromium, and the
# policies' native unit tests) against the real services, and schemathesis on the API.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cloudai-target}"
started=$(date +%s)
stage_started=
# Each stage's heading, after how long the one before it took.
stage() {
  local now
  now=$(date +%s)
  [ -z "$stage_started" ] || echo "   (took $(( now - stage_started )) s)"
  stage_started=$now
  echo "== $*"
}

stage "set-up (what the tests need and this machine lacks)"
scripts/setup.sh
stage "services (FerretDB, Docker)"
eval "$(scripts/services.sh)"
export CLOUDAI_TEST_MONGODB_URI

stage "policy components (wasm32-wasip2)"
export CLOUDAI_POLICY_WASM_DIR="$CARGO_TARGET_DIR/policies"
scripts/build-policies.sh "$CLOUDAI_POLICY_WASM_DIR"

stage "example policies in JavaScript and Python (the conformance kit runs on them in cargo test)"
export CLOUDAI_EXAMPLE_POLICY_WASM_DIR="$CARGO_TARGET_DIR/example-policies"
scripts/build-example-policies.sh "$CLOUDAI_EXAMPLE_POLICY_WASM_DIR"

stage "browser tests' packages (tests/browser: playwright-core, driving the system's Chromium)"
if [ ! -f tests/browser/node_modules/.package-lock.json ] ||
   [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  (cd tests/browser && npm ci --no-audit --no-fund)
fi

stage "cargo fmt --check"
cargo fmt --all -- --check
stage "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
stage "the product without test support (the conformance suite and the test image are test-only)"
cargo clippy -p cloudai --bin cloudai --locked -- -D warnings
stage "cargo test (MongoDB tests against $CLOUDAI_TEST_MONGODB_URI)"
cargo test --workspace --locked
stage "systemd units (deploy/): systemd-analyze verify, against the binary the e2e tests built"
scripts/check-units.sh "$CARGO_TARGET_DIR/debug/cloudai-under-test"
stage "the API's contract: schemathesis, every check and phase, against a real cloudai serve"
scripts/schemathesis.sh "$CARGO_TARGET_DIR/debug/cloudai-under-test"
stage "the otlp feature: lints, and spans exported to a collector on loopback"
cargo clippy -p cloudai --features otlp --all-targets --locked -- -D warnings
cargo test -p cloudai --features otlp --lib --locked telemetry
stage "all tests passed"
echo "   (in $(( $(date +%s) - started )) s)"
