#!/usr/bin/env bash
# Recovery at real width: `samtrain local` trains a 2-worker job of the
# InstructBLIP-Vicuna-7B config at its real widths with few layers (as
# benches/run_load.sh makes it: 4 ViT, 4 Q-Former and 2 decoder layers,
# random weights), SIGKILLs one worker once the checkpoint of step EVERY
# has committed, and reads from the logs how long the job took from the
# kill to the next generation formed, to each rank's model ready (the
# survivor's resident, the replacement's cold load), to the checkpoint
# restored and to the first training step (docs/PERFORMANCE.md, "Recovery
# at real width").
#
# Environment: STEPS (12), EVERY (4), DIR (target/bench/recovery).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STEPS=${STEPS:-12}
EVERY=${EVERY:-4}
DIR=${DIR:-target/bench/recovery}
PY=$ROOT/.venv/bin/python
ST=$ROOT/target/release/samtrain

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
benches/real_width_model.sh "$DIR" "$ST"
[ -d "$DIR/data" ] || "$ST" data synth --task group --samples 64 --images 2 --seed 3 --out "$DIR/data" >&2
rm -rf "$DIR/checkpoints" "$DIR/runs"
cat >"$DIR/job.toml" <<TOML
name = "recovery-bench"
[model]
path = "$DIR/model"
[data]
train = "$DIR/data"
llm_tokenizer = "$DIR/data/tokenizer.json"
loader_threads = 1
max_txt_len = 32
max_output_txt_len = 16
[training]
steps = $STEPS
batch_size = 1
device = "cpu"
threads = 1
log_every = 1
[parallel]
min_workers = 2
max_workers = 2
[checkpoint]
url = "$DIR/checkpoints"
every_steps = $EVERY
keep = 2
[restart]
max_restarts = 3
TOML

"$ST" local "$DIR/job.toml" --json --run-dir "$DIR/runs" >"$DIR/out.json" 2>"$DIR/local.log" &
LOCAL=$!
trap 'kill "$LOCAL" 2>/dev/null || true' EXIT
ckpt=$(printf '%s/checkpoints/step-%08d/manifest.json' "$DIR" "$EVERY")
until [ -f "$ckpt" ]; do
    kill -0 "$LOCAL" 2>/dev/null || { echo "the job ended before step $EVERY" >&2; exit 1; }
    sleep 0.2
done
victim=$(pgrep -P "$LOCAL" | head -n 1)
killed=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
kill -9 "$victim"
echo "bench: killed worker $victim at $killed" >&2
wait "$LOCAL"
trap - EXIT

"$PY" - "$DIR" "$killed" "$EVERY" <<'PYEOF'
import datetime, glob, json, re, sys
root, killed, every = sys.argv[1], sys.argv[2], sys.argv[3]
ansi = re.compile(r"\x1b\[[0-9;]*m")
def at(line):
    return datetime.datetime.fromisoformat(line.split()[0].rstrip("Z")[:26])
t0 = at(killed)
since = lambda line: (at(line) - t0).total_seconds()
local = [ansi.sub("", l) for l in open(f"{root}/local.log")]
formed = next(l for l in local if "generation formed" in l and "generation=1" in l)
print(f"a worker SIGKILLed once step {every}'s checkpoint committed (real widths, 4+4+2 layers, "
      f"fp32, CPU, 1 thread per worker); seconds after the kill:")
print(f"  next generation formed: {since(formed):.2f}")
for log in sorted(glob.glob(f"{root}/runs/local-*.log")):
    lines = [ansi.sub("", l) for l in open(log)]
    g1 = [l for l in lines if "generation=1 " in l]
    if not g1:
        continue
    ready = next(l for l in g1 if "model ready" in l)
    reused = re.search(r"reused=(\w+)", ready).group(1)
    load_s = float(re.search(r" seconds=([\d.]+)", ready).group(1))
    resumed = next(l for l in g1 if "resumed from checkpoint" in l)
    step = next(l for l in g1 if "train step" in l)
    who = "survivor (resident model)" if reused == "true" else "replacement (cold load)"
    print(f"  {log.rsplit('/', 1)[1]}, {who}: model ready {since(ready):.2f} (load {load_s:.2f} s), "
          f"checkpoint restored {since(resumed):.2f}, first step done {since(step):.2f}")
out = json.load(open(f"{root}/out.json"))
print(f"job: {out['state']}, restarts {out['restarts']}, worker restarts {out['worker_restarts']}")
PYEOF
