#!/usr/bin/env bash
# Builds every Wasm guest under policies/ (shipped policies and test fixtures) as a component for
# wasm32-wasip2, with the small-and-fast `policy` profile, and copies them to one folder as
# <name>.wasm (best-fit.wasm, fixture-trap.wasm, ...).
#
# Usage: scripts/build-policies.sh [OUTPUT_DIR]     (default: $CARGO_TARGET_DIR/policies)
# Works from any directory and offline (cargo --locked, crates already in the local registry).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cloudai-target}"
out="${1:-$CARGO_TARGET_DIR/policies}"
target=wasm32-wasip2
profile=policy

if [ ! -d "$(rustc --print sysroot)/lib/rustlib/$target" ]; then
    echo "error: the Rust target $target is not installed; install it with:" >&2
    echo "    rustup target add $target" >&2
    exit 1
fi

# A guest is a crate under policies/ whose library is a cdylib (policies/kit is a plain rlib).
packages=()
while IFS= read -r manifest; do
    if grep -q '"cdylib"' "$manifest"; then
        packages+=("$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -n 1)")
    fi
done < <(find policies -name Cargo.toml -not -path '*/target/*' | sort)
if [ ${#packages[@]} -eq 0 ]; then
    echo "error: no guest crate found under $repo/policies" >&2
    exit 1
fi

args=()
for p in "${packages[@]}"; do args+=(-p "$p"); done
start=$SECONDS
cargo build --locked --profile "$profile" --target "$target" "${args[@]}"
elapsed=$((SECONDS - start))

mkdir -p "$out"
echo "Policy components in $out (built in ${elapsed}s):"
for p in "${packages[@]}"; do
    file="$CARGO_TARGET_DIR/$target/$profile/${p//-/_}.wasm"
    if [ ! -f "$file" ]; then
        echo "error: cargo built $p but $file is missing" >&2
        exit 1
    fi
    name="${p#cloudai-policy-}"
    cp "$file" "$out/$name.wasm"
    printf '  %-28s %8d bytes\n' "$name.wasm" "$(stat -c %s "$out/$name.wasm")"
done
