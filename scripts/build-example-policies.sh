#!/usr/bin/env bash
# Builds the example policies written in JavaScript and Python (examples/policies/js and
# examples/policies/python) as WebAssembly components, into one folder:
#
#   js-spread.wasm  js-quota.wasm     JavaScript, componentize-qjs (QuickJS), pinned in
#                                     examples/policies/js/package-lock.json
#   py-spread.wasm  py-quota.wasm     Python, componentize-py, pinned in
#                                     examples/policies/python/requirements.txt
#
# (`*-spread` implement the `placement` world, `*-quota` the `admission` world.) It runs each
# language's unit tests first. Usage:
#
#   scripts/build-example-policies.sh [OUTPUT_DIR]   (default: $CARGO_TARGET_DIR/example-policies)
#
# Needs node + npm (Node >= 18) and python3 (>= 3.10, with venv), and nothing but the npm and
# PyPI registries: the toolchains are installed with `npm ci` and `pip install` into a cache
# ($CLOUDAI_CACHE_DIR, default /var/tmp/cloudai-cache), keyed by the lock files, and built
# components are cached by the hash of everything they are built from, so a rerun with
# nothing changed takes about a second.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

out="${1:-${CARGO_TARGET_DIR:-/var/tmp/cloudai-target}/example-policies}"
cache="${CLOUDAI_CACHE_DIR:-/var/tmp/cloudai-cache}/example-policies"
js_src=examples/policies/js
py_src=examples/policies/python

log() { echo "[example-policies] $*" >&2; }
fail() { echo "[example-policies] error: $*" >&2; exit 1; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

command -v node >/dev/null && command -v npm >/dev/null ||
    fail "node and npm are needed for the JavaScript policies (Debian: apt-get install nodejs npm)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' ||
    fail "Node >= 18 is needed, found $(node --version)"
command -v python3 >/dev/null || fail "python3 is needed for the Python policies"
python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    fail "python3 >= 3.10 with the venv module is needed (Debian: apt-get install python3-venv)"

mkdir -p "$cache" "$out"
start=$SECONDS

# --- toolchains ---------------------------------------------------------------------------

# node_modules for the exact lock file, installed once (npm ci: the lock file, nothing newer).
js_tools="$cache/js-$(hash_of "$js_src/package.json" "$js_src/package-lock.json")"
if [ ! -f "$js_tools/.installed" ]; then
    log "installing the JavaScript toolchain (npm ci) into $js_tools"
    rm -rf "$js_tools"
    mkdir -p "$js_tools"
    cp "$js_src/package.json" "$js_src/package-lock.json" "$js_tools/"
    (cd "$js_tools" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error) ||
        fail "npm ci failed in $js_tools (is the npm registry reachable?)"
    touch "$js_tools/.installed"
fi
componentize_qjs="$js_tools/node_modules/.bin/componentize-qjs"
[ -x "$componentize_qjs" ] || fail "$componentize_qjs is missing; delete $js_tools and rerun"

# A venv for the exact requirements, never the system's site-packages.
py_tools="$cache/py-$(hash_of "$py_src/requirements.txt" <(python3 --version))"
if [ ! -f "$py_tools/.installed" ]; then
    log "installing the Python toolchain (pip install -r requirements.txt) into $py_tools"
    rm -rf "$py_tools"
    python3 -m venv "$py_tools" || fail "python3 -m venv $py_tools failed"
    "$py_tools/bin/pip" install --quiet --disable-pip-version-check --no-input \
        -r "$py_src/requirements.txt" ||
        fail "pip install failed in $py_tools (is PyPI reachable?)"
    touch "$py_tools/.installed"
fi
componentize_py="$py_tools/bin/componentize-py"
[ -x "$componentize_py" ] || fail "$componentize_py is missing; delete $py_tools and rerun"

# --- unit tests ---------------------------------------------------------------------------

log "JavaScript unit tests (node --test)"
(cd "$js_src" && node --test --test-reporter=dot test.mjs) || fail "the JavaScript unit tests failed"

log "Python unit tests (unittest, with the generated bindings)"
bindings="$py_tools/bindings-$(hash_of wit/policy.wit)"
if [ ! -d "$bindings" ]; then
    "$componentize_py" -q -d wit -w placement -w admission bindings "$bindings.tmp" ||
        fail "componentize-py could not generate the bindings of wit/policy.wit"
    mv "$bindings.tmp" "$bindings"
fi
(cd "$py_src" && PYTHONPATH="$bindings:." PYTHONDONTWRITEBYTECODE=1 \
    "$py_tools/bin/python" -m unittest -q test_policies) || fail "the Python unit tests failed"

# --- components ---------------------------------------------------------------------------

# build NAME WORLD INPUTS COMMAND... : runs COMMAND (an argument @OUT@ is the file it writes)
# unless a component built from the same inputs is cached, then copies it to $out/NAME.wasm.
build() {
    local name=$1 world=$2 inputs=$3
    shift 3
    local key cached
    # shellcheck disable=SC2086 # $inputs is a list of paths
    key=$(hash_of wit/policy.wit $inputs <(echo "$world $*"))
    cached="$cache/built/$name-$key.wasm"
    if [ -f "$cached" ]; then
        log "$name.wasm: unchanged, from the cache"
    else
        log "$name.wasm: building ($world world)"
        mkdir -p "$cache/built"
        rm -f "$cache/built/$name-"*.wasm
        local tmp="$cached.tmp" t0=$SECONDS args=() a
        for a in "$@"; do
            [ "$a" = @OUT@ ] && a=$tmp
            args+=("$a")
        done
        "${args[@]}" >"$cache/built/$name.log" 2>&1 || {
            cat "$cache/built/$name.log" >&2
            fail "building $name.wasm failed (the output is above)"
        }
        mv "$tmp" "$cached"
        log "$name.wasm: built in $((SECONDS - t0))s"
    fi
    cp "$cached" "$out/$name.wasm"
}

js_inputs="$js_src/common.js $js_src/package-lock.json"
# --sync: no component-model async ABI; --stub-wasi: no WASI import at all (a policy has no
# use for one: the host grants nothing, and logging goes through cloudai:policy/host);
# --disable-gc: every round runs on a fresh instance, so collecting is wasted time (it halved
# a round of 100 tasks x 10,000 workers) and memory stays bounded by one round's input.
build js-spread placement "$js_inputs $js_src/spread.js" \
    "$componentize_qjs" --wit wit --world placement --js "$js_src/spread.js" \
    --sync --stub-wasi --disable-gc -o @OUT@
build js-quota admission "$js_inputs $js_src/quota.js" \
    "$componentize_qjs" --wit wit --world admission --js "$js_src/quota.js" \
    --sync --stub-wasi --disable-gc -o @OUT@

py_inputs="$py_src/common.py $py_src/requirements.txt"
build py-spread placement "$py_inputs $py_src/spread.py" \
    "$componentize_py" -q -d wit -w placement componentize -p "$py_src" -s spread -o @OUT@
build py-quota admission "$py_inputs $py_src/quota.py" \
    "$componentize_py" -q -d wit -w admission componentize -p "$py_src" -s quota -o @OUT@

echo "Example policy components in $out (in $((SECONDS - start))s):"
for name in js-spread js-quota py-spread py-quota; do
    printf '  %-16s %10d bytes\n' "$name.wasm" "$(stat -c %s "$out/$name.wasm")"
done
