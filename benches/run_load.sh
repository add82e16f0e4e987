#!/usr/bin/env bash
# Loads one model folder of more than 1 GB (fp32 on disk) as DTYPE with
# samtrain and with transformers' from_pretrained, alternating REPEATS times
# (one load per process), and prints each run's seconds and peak host memory
# (docs/PERFORMANCE.md, "Loading a model folder in bf16").
#
# The folder is the shipped InstructBLIP-Vicuna-7B config at its real widths
# with 4 ViT, 4 Q-Former and 2 decoder layers (about 0.5 B parameters, 2 GB
# in fp32), random weights, made once by `samtrain model init`.
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
if [ ! -f "$DIR/model/model.safetensors" ]; then
    "$PY" - "$DIR/config.json" <<'PYEOF'
import json, sys
c = json.load(open("examples/sam-vicuna7b/config.json"))
c["vision_config"]["num_hidden_layers"] = 4
c["qformer_config"]["num_hidden_layers"] = 4
c["text_config"]["num_hidden_layers"] = 2
json.dump(c, open(sys.argv[1], "w"), indent=2)
PYEOF
    target/release/samtrain model init --config "$DIR/config.json" --out "$DIR/model"
fi
du -sh "$DIR/model" >&2
for ((i = 0; i < REPEATS; i++)); do
    target/release/samtrain bench load --model "$DIR/model" --dtype "$DTYPE"
    "$PY" benches/load_transformers.py --model "$DIR/model" --dtype "$DTYPE"
done
