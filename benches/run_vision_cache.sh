#!/usr/bin/env bash
# Step time with and without `model.vision_cache`, with a vision encoder at
# ViT-g's width (1408, MLP 6144, 16 heads, 224 px images in 14 px patches;
# VIT_LAYERS of its 39 layers) in front of the demo's small Q-Former and
# decoder, the encoder frozen and the Q-Former and projection trained, as
# SAM trains. `samtrain train` (one process) runs 2 epochs of a 3-image
# synthetic set, once without the cache and once with an empty one (epoch
# 1 fills it, epoch 2 reads it), and the median step time of each epoch is
# printed (docs/PERFORMANCE.md, "Frozen encoders computed once").
#
# Environment: SAMPLES (12), BATCH (2), VIT_LAYERS (2), THREADS (2),
# DIR (target/bench/vision-cache).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SAMPLES=${SAMPLES:-12}
BATCH=${BATCH:-2}
VIT_LAYERS=${VIT_LAYERS:-2}
THREADS=${THREADS:-2}
DIR=${DIR:-target/bench/vision-cache}
PY=$ROOT/.venv/bin/python
STEPS=$((2 * SAMPLES / BATCH))

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
benches/wide_vision_config.sh "$DIR/model.json" 1408 6144 16 "$VIT_LAYERS" qformer

job() { # $1: the run's folder; then overrides (benches/synth_job.sh)
    local run=$1
    shift
    benches/synth_job.sh vision-cache "$DIR" "$run" "$STEPS" "$BATCH" 1 \
        data.synth.train_samples="$SAMPLES" data.synth.images=3 data.synth.seed=5 \
        training.threads="$THREADS" "$@"
}

for side in plain cached; do
    run="$DIR/$side"
    rm -rf "$run"
    mkdir -p "$run"
    extra=()
    [[ $side == cached ]] && extra=(model.vision_cache="\"$run/vision\"")
    job "$run" "${extra[@]}" >"$run/job.toml"
    target/release/samtrain train "$run/job.toml" --json >"$run/out.json" 2>"$run/train.log"
done

"$PY" - "$DIR" "$STEPS" <<'PYEOF'
import re, statistics, sys, os
root, steps = sys.argv[1], int(sys.argv[2])
ansi = re.compile(r"\x1b\[[0-9;]*m")
def times(side):
    out = {}
    for line in map(lambda l: ansi.sub("", l), open(f"{root}/{side}/train.log")):
        if "train step" in line and "compute_s=" in line:
            step = int(re.search(r"\bstep=(\d+)", line).group(1))
            c = float(re.search(r"\bcompute_s=([0-9.eE+-]+)", line).group(1))
            m = float(re.search(r"\bcomm_s=([0-9.eE+-]+)", line).group(1))
            out[step] = c + m
    half = steps // 2
    # Step 1 of each run warms up; the median ignores it.
    return ([out[s] for s in range(1, half + 1)], [out[s] for s in range(half + 1, steps + 1)])
(p1, p2), (c1, c2) = times("plain"), times("cached")
med = lambda xs: statistics.median(xs) * 1e3
files = len([f for f in os.listdir(f"{root}/cached/vision") if f.endswith(".pt")])
print(f"{'step (ms), median':24}{'no cache':>12}{'cache':>12}{'speedup':>10}")
print(f"{'epoch 1':24}{med(p1):12.1f}{med(c1):12.1f}{med(p1) / med(c1):10.2f}")
print(f"{'epoch 2':24}{med(p2):12.1f}{med(c2):12.1f}{med(p2) / med(c2):10.2f}")
print(f"cache: {files} images kept")
PYEOF
