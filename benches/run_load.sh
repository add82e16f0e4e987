#!/usr/bin/env bash
# Loads one model folder of more than 1 GB (fp32 on disk) as DTYPE with
# samtrain and with transformers' from_pretrained, alternating REPEATS times
# (one load per process), and prints each run's seconds and peak host memory
# (docs/PERFORMANCE.md, "Loading a model folder in bf16").
#
# The folder is the shipped InstructBLIP-Vicuna-7B config at its real widths
# with 4 ViT, 4 Q-Former and 2 decoder layers (851 M parameters, 3.2 GB in
# fp32), random weights, made once by benches/real_width_model.sh.
#
# Environment: DTYPE (bf16), REPEATS (3), DIR (target/bench/load).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DTYPE=${DTYPE:-bf16}
REPEATS=${REPEATS:-3}
DIR=${DIR:-target/bench/load}
PY=$ROOT/.venv/bin/python

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
mkdir -p "$DIR"
benches/real_width_model.sh "$DIR" target/release/samtrain
du -sh "$DIR/model" >&2
for ((i = 0; i < REPEATS; i++)); do
    target/release/samtrain bench load --model "$DIR/model" --dtype "$DTYPE"
    "$PY" benches/load_transformers.py --model "$DIR/model" --dtype "$DTYPE"
done
