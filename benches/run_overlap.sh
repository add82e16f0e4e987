#!/usr/bin/env bash
# Trains a model whose every tensor trains (the demo's Q-Former and decoder
# behind a 6-layer, 512-wide vision encoder on 224 px images: 21 M
# parameters, 84 MB of fp32 gradients to sum per step) with 2 data-parallel
# workers (`samtrain local`), with `parallel.overlap_grad_reduce` off and on,
# alternating ROUNDS times, and prints the step time (the slower rank's
# compute plus communication) and the communication the step waited for
# (docs/PERFORMANCE.md, "Gradient reduction during backward").
#
# Environment: STEPS (30), BATCH (4), ROUNDS (2), THREADS (1),
# DIR (target/bench/overlap).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STEPS=${STEPS:-30}
BATCH=${BATCH:-4}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-1}
DIR=${DIR:-target/bench/overlap}
PY=$ROOT/.venv/bin/python

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
benches/wide_vision_config.sh "$DIR/model.json" 512 2048 8 6 all

job() { # $1: overlap_grad_reduce (true/false); $2: the run's folder
    benches/synth_job.sh overlap "$DIR" "$2" "$STEPS" "$BATCH" 2 parallel.overlap_grad_reduce="$1" \
        training.threads="$THREADS"
}

for ((i = 0; i < ROUNDS; i++)); do
    for overlap in false true; do
        run="$DIR/run-$i-$overlap"
        rm -rf "$run"
        mkdir -p "$run"
        job "$overlap" "$run" >"$run/job.toml"
        target/release/samtrain local "$run/job.toml" --json --run-dir "$run/logs" \
            >"$run/out.json" 2>"$run/local.log"
    done
done

"$PY" - "$DIR" "$ROUNDS" <<'PYEOF'
import glob, re, statistics, sys
root, rounds = sys.argv[1], int(sys.argv[2])
ansi = re.compile(r"\x1b\[[0-9;]*m")
field = lambda name, line: float(re.search(rf"\b{name}=([0-9.eE+-]+)", line).group(1))
rows = {}
for overlap in ("false", "true"):
    step, comm, loss = [], [], []
    for i in range(rounds):
        run = f"{root}/run-{i}-{overlap}"
        by_step = {}
        for log in sorted(glob.glob(f"{run}/logs/local-*.log")):
            for line in map(lambda l: ansi.sub("", l), open(log)):
                if "train step" in line and "compute_s=" in line:
                    by_step.setdefault(int(field("step", line)), []).append(
                        (field("compute_s", line), field("comm_s", line), field("loss", line)))
        # The first steps warm up (the first overlapped one learns the order).
        for s, ranks in sorted(by_step.items()):
            if s > 3 and len(ranks) == 2:
                step.append(max(c + m for c, m, _ in ranks))
                comm.append(max(m for _, m, _ in ranks))
        loss.append(by_step[max(by_step)][0][2])
    rows[overlap] = (statistics.median(step) * 1e3, statistics.median(comm) * 1e3, len(step), loss)
print(f"{'':36}{'after backward':>16}{'during backward':>17}")
for k, label in enumerate(["step (ms, median)", "communication waited for (ms, median)", "steps measured"]):
    print(f"{label:36}{rows['false'][k]:16.1f}{rows['true'][k]:17.1f}")
print(f"last step's loss by round: after backward {rows['false'][3]}, during {rows['true'][3]}")
PYEOF
