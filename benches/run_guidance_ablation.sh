#!/usr/bin/env bash
# SAM's claim in miniature: the demo's job trained with SAM's guidance on
# and off, over SEEDS seeds, on the demo's task (3 images per sample) and on
# a harder one where relating the images matters more (HARD_IMAGES images,
# up to 3 distractors each instead of the demo's 1); reports the share of held-out answers naming
# the shared object and CIDEr, mean and spread (docs/PERFORMANCE.md,
# "Guidance on and off").
#
# Each run is `samtrain local` on examples/demo.toml with its own folder,
# the model of examples/demo-model.json with `samtrain.guidance` and
# `init_seed` set, and `training.seed` = the seed. The dataset of a task is
# the same for every run (the demo's synthesis seed).
#
# Environment: SEEDS (3), STEPS (1400, the demo's), HARD_IMAGES (5), DIR
# (target/bench/ablation).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SEEDS=${SEEDS:-3}
STEPS=${STEPS:-1400}
HARD_IMAGES=${HARD_IMAGES:-5}
DIR=${DIR:-target/bench/ablation}
PY=$ROOT/.venv/bin/python
ST=$ROOT/target/release/samtrain

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
mkdir -p "$DIR"
RESULTS=$DIR/results.jsonl
: >"$RESULTS"

# run TASK IMAGES DISTRACTORS GUIDANCE SEED
run() {
    local task=$1 images=$2 distractors=$3 guidance=$4 seed=$5
    local out=$DIR/$task-$guidance-$seed
    rm -rf "$out"
    mkdir -p "$out"
    "$PY" - "$out" "$guidance" "$seed" <<'PYEOF'
import json, sys
out, guidance, seed = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
c = json.load(open("examples/demo-model.json"))
c["samtrain"]["guidance"] = guidance
c["samtrain"]["init_seed"] = seed
json.dump(c, open(f"{out}/model.json", "w"), indent=2)
PYEOF
    # The dataset is shared by the runs of a task: synthesised once.
    local data=$DIR/data-$task
    sed -e "s|target/demo/data|$data|g" -e "s|target/demo|$out|g" \
        -e "s|^init = .*|init = \"$out/model.json\"|" \
        -e "s|^images = .*|images = $images|" \
        -e "s|^max_distractors = .*|max_distractors = $distractors|" \
        -e "s|^steps = .*|steps = $STEPS|" \
        -e "s|^seed = 0$|seed = $seed|" \
        examples/demo.toml >"$out/job.toml"
    echo "bench: $task, guidance $guidance, seed $seed" >&2
    "$ST" local "$out/job.toml" --json 2>"$out/log.txt" | tail -1 >"$out/result.json"
    "$PY" - "$out" "$task" "$guidance" "$seed" >>"$RESULTS" <<'PYEOF'
import json, re, sys
out, task, guidance, seed = sys.argv[1:5]
result = json.load(open(f"{out}/result.json"))
pred = json.load(open(f"{out}/eval/pred.json"))
# The content measure of samtrain demo (data/src/mmlink/content.rs) for
# group captioning: the answer's colour and shape words, and no other.
words = {"red", "green", "blue", "yellow", "purple", "black",
         "circle", "square", "triangle", "star", "cross", "diamond"}
def objects(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w in words}
named = sum(objects(p["pred_response"]) == objects(p["gt_response"]) for p in pred)
print(json.dumps({
    "task": task, "guidance": guidance, "seed": int(seed),
    "state": result["state"], "cider": result["eval"]["cider"],
    "accuracy": named / len(pred),
    "distinct_answers": len({p["pred_response"] for p in pred}),
}))
PYEOF
}

for seed in $(seq 1 "$SEEDS"); do
    for guidance in on off; do
        run demo 3 1 "$guidance" "$seed"
        run hard "$HARD_IMAGES" 3 "$guidance" "$seed"
    done
done

"$PY" - "$RESULTS" "$STEPS" "$HARD_IMAGES" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]} steps per run; demo task: 3 images per sample; hard: {sys.argv[3]} images")
print(f"{'task':<6}{'guidance':<10}{'accuracy mean':>15}{'spread':>9}{'CIDEr mean':>12}{'spread':>9}  runs (accuracy, CIDEr, distinct answers)")
for task in ("demo", "hard"):
    for guidance in ("on", "off"):
        rs = [r for r in rows if r["task"] == task and r["guidance"] == guidance]
        acc = [r["accuracy"] * 100 for r in rs]
        cider = [r["cider"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        runs = "; ".join(f"{a:.1f}%, {c:.1f}, {r['distinct_answers']}" for a, c, r in zip(acc, cider, rs))
        print(f"{task:<6}{guidance:<10}{statistics.mean(acc):>14.1f}%{sd(acc):>8.1f}%"
              f"{statistics.mean(cider):>12.2f}{sd(cider):>9.2f}  {runs}")
PYEOF
