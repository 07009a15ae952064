#!/usr/bin/env bash
# Runs the whole test suite: brings up the services the tests need (FerretDB, Docker) when
# absent, then formatting, lints, and every test of the workspace against the real services.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cloudai-target}"
eval "$(scripts/services.sh)"
export CLOUDAI_TEST_MONGODB_URI

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (MongoDB tests against $CLOUDAI_TEST_MONGODB_URI)"
cargo test --workspace --locked
