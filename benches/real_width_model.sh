#!/usr/bin/env bash
# Makes DIR/model once: the shipped InstructBLIP-Vicuna-7B config at its
# real widths with 4 ViT, 4 Q-Former and 2 decoder layers (3.2 GB of fp32
# on disk), random weights, by `samtrain model init`. Used by the
# benchmarks that need a real-width model folder (run_load.sh,
# run_recovery.sh).
#
# Usage: benches/real_width_model.sh DIR SAMTRAIN_BINARY
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$1
ST=$2
[ -f "$DIR/model/model.safetensors" ] && exit 0
mkdir -p "$DIR"
"$ROOT/.venv/bin/python" - "$ROOT/examples/sam-vicuna7b/config.json" "$DIR/config.json" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["vision_config"]["num_hidden_layers"] = 4
c["qformer_config"]["num_hidden_layers"] = 4
c["text_config"]["num_hidden_layers"] = 2
json.dump(c, open(sys.argv[2], "w"), indent=2)
PYEOF
"$ST" model init --config "$DIR/config.json" --out "$DIR/model" >&2
