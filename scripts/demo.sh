#!/usr/bin/env bash
# The main job: sets up the machine (scripts/setup.sh), builds samtrain in
# release mode and runs `samtrain demo`, a small end-to-end run of the model.
# Extra arguments go to `samtrain demo` (see `samtrain demo --help`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/setup.sh

export SAMTRAIN_PYTHON=$ROOT/.venv/bin/python

echo "demo: cargo build --release" >&2
cargo build --release
exec target/release/samtrain demo "$@"
