#!/usr/bin/env bash
# Trains the demo's model with a vision encoder of ViT-g's proportions
# (224 px images, 14 px patches, width 256, 4 layers: the image side
# dominates a step, as in SAM) with 2 data-parallel workers (`samtrain
# local`) on a mixed-image synthetic set (2 to 8 images per sample), once with the
# ranks taking their global batch's samples in blocks and once with
# `data.balance_images`, alternating ROUNDS times, and prints how far apart
# the two ranks' compute times are at each step (docs/PERFORMANCE.md,
# "Balanced ranks").
#
# Environment: STEPS (40), BATCH (4), ROUNDS (2), DIR (target/bench/balance).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STEPS=${STEPS:-40}
BATCH=${BATCH:-4}
ROUNDS=${ROUNDS:-2}
DIR=${DIR:-target/bench/balance}
PY=$ROOT/.venv/bin/python

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
benches/wide_vision_config.sh "$DIR/model.json" 256 1024 4 4 all

job() { # $1: balance_images (true/false); $2: the run's folder
    benches/synth_job.sh balance "$DIR" "$2" "$STEPS" "$BATCH" 2 data.balance_images="$1" \
        data.synth.train_samples=512 data.synth.images=8 data.synth.min_images=2 training.lr=1e-3
}

for ((i = 0; i < ROUNDS; i++)); do
    for balance in false true; do
        run="$DIR/run-$i-$balance"
        rm -rf "$run"
        mkdir -p "$run"
        job "$balance" "$run" >"$run/job.toml"
        target/release/samtrain local "$run/job.toml" --json --run-dir "$run/logs" \
            >"$run/out.json" 2>"$run/local.log"
    done
done

"$PY" - "$DIR" "$ROUNDS" <<'PYEOF'
import glob, re, statistics, sys
root, rounds = sys.argv[1], int(sys.argv[2])
ansi = re.compile(r"\x1b\[[0-9;]*m")
field = lambda name, line: float(re.search(rf"\b{name}=([0-9.eE+-]+)", line).group(1))
def steps(run):
    """{step: [(compute_s, comm_s) per rank]} from the workers' logs."""
    by_step = {}
    for log in sorted(glob.glob(f"{run}/logs/local-*.log")):
        for line in map(lambda l: ansi.sub("", l), open(log)):
            if "train step" in line and "compute_s=" in line:
                step = int(field("step", line))
                by_step.setdefault(step, []).append((field("compute_s", line), field("comm_s", line)))
    # The first steps warm up; steps some rank did not log are left out.
    return [v for s, v in sorted(by_step.items()) if s > 5 and len(v) == 2]
print(f"{'':34}{'blocks':>10}{'balanced':>10}")
rows = {}
for balance in ("false", "true"):
    spread, slow, step = [], [], []
    for i in range(rounds):
        for ranks in steps(f"{root}/run-{i}-{balance}"):
            c = [r[0] for r in ranks]
            spread.append((max(c) - min(c)) / statistics.mean(c))
            slow.append(max(c))
            step.append(max(r[0] + r[1] for r in ranks))
    rows[balance] = (statistics.median(spread) * 100, statistics.mean(spread) * 100,
                     statistics.median(slow) * 1e3, statistics.median(step) * 1e3, len(step))
labels = ["rank compute spread, median (%)", "rank compute spread, mean (%)",
          "slower rank's compute (ms)", "step (ms)", "steps measured"]
for k, label in enumerate(labels):
    a, b = rows["false"][k], rows["true"][k]
    print(f"{label:34}{a:10.1f}{b:10.1f}")
PYEOF
