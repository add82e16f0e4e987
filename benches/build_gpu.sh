#!/usr/bin/env bash
# Builds what benches/run_gpu.sh runs on a GPU machine that has PyTorch but
# no Rust toolchain: samtrain (with NCCL) and the test binaries of the CUDA
# tests, linked against the libtorch of THAT machine's torch version, into
# OUT_DIR, stripped, small enough to copy there.
#
# tch 0.26 is written for libtorch 2.13; an older libtorch lacks a few of the
# ops its generated C++ wraps. This script builds against a copy of
# torch-sys whose wrappers of those ops (found by compiling the generated
# file against the target's headers) throw "not in this libtorch" instead;
# samtrain calls none of them. The repository's own build is untouched: the
# copy is patched in with `--config`, in a copy of the source tree with its
# own target folder, all under the samtrain cache.
#
# Environment: TORCH_VERSION (2.11.0, the GPU machine's), OUT_DIR (target/gpu).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TORCH_VERSION=${TORCH_VERSION:-2.11.0}
OUT_DIR=${OUT_DIR:-target/gpu}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/samtrain
VENV=$CACHE/venv-torch-$TORCH_VERSION
SYS=$CACHE/torch-sys-for-$TORCH_VERSION
SRC=$CACHE/gpu-src
TARGET=$CACHE/target-torch-$TORCH_VERSION

say() { echo "build_gpu: $*" >&2; }

# --- the target's libtorch: the PyPI wheel of that version (headers, libs)
if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION')" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "torch==$TORCH_VERSION"
fi
LIBTORCH=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')

# --- torch-sys with the ops that libtorch lacks stubbed out
SYS_VERSION=$(awk '/^name = "torch-sys"/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
if [[ ! -f $SYS/.patched ]]; then
    cargo fetch --locked >/dev/null
    REGISTRY_SYS=$(ls -d "$HOME"/.cargo/registry/src/*/torch-sys-"$SYS_VERSION" | head -1)
    rm -rf "$SYS"
    cp -r "$REGISTRY_SYS" "$SYS"
    GENERATED=$SYS/libtch/torch_api_generated.cpp
    say "finding the ops libtorch $TORCH_VERSION lacks (compiling $GENERATED)"
    MISSING=$( (LC_ALL=C g++ -fsyntax-only -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 \
        -I "$LIBTORCH/include" -I "$LIBTORCH/include/torch/csrc/api/include" \
        -I "$SYS/libtch" "$GENERATED" 2>&1 || true) |
        sed -n "s/.*In function 'void \(atg_[A-Za-z0-9_]*\)(.*/\1/p" | sort -u)
    say "stubbing: $(echo $MISSING)"
    "$VENV/bin/python" - "$GENERATED" $MISSING <<'PYEOF'
import re, sys
path, names = sys.argv[1], sys.argv[2:]
src = open(path).read()
for name in names:
    # The wrapper's body is `PROTECT(...)`: keep the wrapper, so tch still
    # links, and make it throw, which tch turns into an error.
    m = re.search(r"\n\S[^\n]*\b" + re.escape(name) + r"\([^\n]*\{\n  PROTECT\(\n(.*?)\n  \)\n\}", src, re.S)
    assert m, f"no wrapper {name} in {path}"
    body = f'    throw std::runtime_error("{name[4:]} is not in this libtorch");'
    src = src[: m.start(1)] + body + src[m.end(1):]
open(path, "w").write(src)
PYEOF
    touch "$SYS/.patched"
fi

# --- a copy of the tree (the patch would rewrite Cargo.lock), built there
say "copying the source tree to $SRC"
rm -rf "$SRC"
mkdir -p "$SRC"
tar --exclude=./target --exclude=./.venv --exclude=./.libtorch --exclude=./.git -cf - . | tar -xf - -C "$SRC"
export LIBTORCH LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=$TARGET
PATCH=(--config "patch.crates-io.torch-sys.path=\"$SYS\"")
say "cargo build --release --features nccl (libtorch $TORCH_VERSION)"
(cd "$SRC" && cargo build --release --features nccl --bin samtrain "${PATCH[@]}")
# The test executables, by name, from cargo's JSON messages.
TESTS=$(cd "$SRC" && cargo test --release --no-run --message-format=json "${PATCH[@]}" \
    -p samtrain-torchext --test ops --test cuda -p samtrain-worker --test optim \
    -p samtrain-model --test precision -p samtrain-checkpoint --test local 2>/dev/null |
    "$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')

mkdir -p "$OUT_DIR"
strip -o "$OUT_DIR/samtrain" "$TARGET/release/samtrain"
while read -r name executable; do
    strip -o "$OUT_DIR/test-$name" "$executable"
done <<<"$TESTS"
echo "$TORCH_VERSION" >"$OUT_DIR/torch-version"
say "built for libtorch $TORCH_VERSION: $(ls "$OUT_DIR" | tr '\n' ' ')($(du -sh "$OUT_DIR" | cut -f1))"
