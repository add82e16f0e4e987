#!/usr/bin/env bash
# Runs every check samtrain has: set-up (scripts/setup.sh), formatting, clippy
# with warnings as errors, then the whole workspace's tests. Extra arguments
# go to `cargo test`, e.g. `scripts/test.sh -p samtrain-model -- beam`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/setup.sh

# Tests that compare against the Python reference implementations use this.
export SAMTRAIN_PYTHON=$ROOT/.venv/bin/python

echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
echo "test: cargo clippy" >&2
cargo clippy --workspace --all-targets -- -D warnings
# `cargo test --workspace -p X` would ignore `-p` and test every crate, so a
# package chosen in the arguments replaces --workspace.
scope=(--workspace)
for arg in "$@"; do
    case $arg in
    --) break ;;
    -p* | --package | --package=*) scope=() ;;
    esac
done
echo "test: cargo test ${scope[*]} $*" >&2
cargo test "${scope[@]}" "$@"
