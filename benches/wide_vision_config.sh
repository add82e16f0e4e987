#!/usr/bin/env bash
# Writes OUT: the demo's model config (examples/demo-model.json: its small
# Q-Former and decoder) behind a vision encoder of the given width, MLP
# width, heads and layers on 224 px images in 14 px patches, so that the
# images drive a step's cost, as in SAM. TRAINABLE is `all` (the demo's
# policy) or `qformer` (the Q-Former and projection, the encoder frozen, as
# SAM trains). Used by run_balance.sh and run_vision_cache.sh.
#
# Usage: benches/wide_vision_config.sh OUT WIDTH MLP HEADS LAYERS TRAINABLE
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/.venv/bin/python" - "$ROOT/examples/demo-model.json" "$@" <<'PYEOF'
import json, sys
source, out, width, mlp, heads, layers, trainable = sys.argv[1:]
config = json.load(open(source))
config["vision_config"].update(hidden_size=int(width), intermediate_size=int(mlp),
                               num_attention_heads=int(heads), num_hidden_layers=int(layers),
                               image_size=224, patch_size=14)
config["qformer_config"]["encoder_hidden_size"] = int(width)
if trainable == "qformer":
    config["samtrain"]["trainable"] = {"qformer": True, "projection": True}
json.dump(config, open(out, "w"), indent=1)
PYEOF
