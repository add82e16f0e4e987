#!/usr/bin/env bash
# Times one training step (forward, backward, AdamW, gradients cleared) of the model in
# benches/train_step_config.json in samtrain and in Python transformers, and
# prints a table (docs/PERFORMANCE.md, "Training step vs transformers").
#
# Builds samtrain in release mode, writes the model folder to target/bench/,
# then runs the sides one after the other, ROUNDS times, so that load from
# other processes spreads over all of them instead of hitting one side.
# Each round runs, in this order: samtrain without guidance (the same
# computation as transformers' InstructBLIP for one image per sample),
# transformers with sdpa attention, samtrain with SAM's guidance (the extra
# W-former pass), transformers with eager attention.
#
# On a shared machine, each run first waits (up to QUIET_WAIT seconds) for a
# second in which other processes use less than 15% of the CPU.
#
# Environment: ROUNDS (3), THREADS (2), STEPS (10), WARMUP (3), BATCH (4),
# IMAGES (1), TEXT_LEN (64), QFORMER_LEN (16), QUIET_WAIT (120), and
# SUPPLEMENT=1 to add to each round three transformers variants: logits at
# the text positions only, fused AdamW (see benches/train_step.py), and
# fused AdamW with the C heap set as samtrain sets its own (src/allocator.rs),
# and samtrain with glibc's default heap, and
# CHECKPOINTING=1 to add both sides with activation checkpointing and a table
# of the memory each step adds (peak resident memory over that before the
# first step: gradients, AdamW's state and the activations), and
# SAVES=1 to add both sides saving the trained state every SAVE_EVERY (3)
# steps into SAVE_DIR (target/bench/saves): samtrain's checkpoint (the
# tensors lent to the upload, read in place in the background, and the loan
# settled before the next optimizer step) and torch.save of the
# model's and AdamW's state_dict, the newest two kept on both sides, with a
# table of what a save costs: the difference in mean step time (all steps,
# the last upload's wait included) from the same side without saves, times
# SAVE_EVERY.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
BATCH=${BATCH:-4}
IMAGES=${IMAGES:-1}
TEXT_LEN=${TEXT_LEN:-64}
QFORMER_LEN=${QFORMER_LEN:-16}
QUIET_WAIT=${QUIET_WAIT:-120}
SUPPLEMENT=${SUPPLEMENT:-0}
CHECKPOINTING=${CHECKPOINTING:-0}
SAVES=${SAVES:-0}
SAVE_EVERY=${SAVE_EVERY:-3}
SAVE_DIR=${SAVE_DIR:-target/bench/saves}
PY=$ROOT/.venv/bin/python
OUT=target/bench
RESULTS=$OUT/train_step.jsonl

echo "bench: cargo build --release" >&2
cargo build --release

rm -rf "$OUT/model" "$OUT/model-guided"
mkdir -p "$OUT"
target/release/samtrain model init --config benches/train_step_config.json --out "$OUT/model" 2>/dev/null
# The guided copy shares the weights and differs only in samtrain.guidance.
mkdir -p "$OUT/model-guided"
ln -s ../model/model.safetensors ../model/sam.safetensors "$OUT/model-guided/"
"$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
config = json.load(open(f"{out}/model/config.json"))
config["samtrain"]["guidance"] = True
json.dump(config, open(f"{out}/model-guided/config.json", "w"), indent=2)
EOF

FLAGS=(--batch "$BATCH" --images "$IMAGES" --text-len "$TEXT_LEN" --qformer-len "$QFORMER_LEN"
    --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --json)
SIDES=(samtrain hf-sdpa samtrain-guided hf-eager)
if [[ $SUPPLEMENT == 1 ]]; then
    SIDES+=(hf-sdpa-text-logits hf-sdpa-fused-adamw hf-sdpa-fused-adamw-malloc samtrain-glibc-malloc)
fi
if [[ $CHECKPOINTING == 1 ]]; then
    SIDES+=(samtrain-checkpointed hf-sdpa-checkpointed)
fi
if [[ $SAVES == 1 ]]; then
    [[ $SUPPLEMENT == 1 ]] || SIDES+=(hf-sdpa-fused-adamw)
    SIDES+=(samtrain-saving hf-sdpa-fused-adamw-saving)
fi

# One run of one side; prints its JSON object.
run_side() {
    local st=(target/release/samtrain bench train-step "${FLAGS[@]}")
    local hf=("$PY" benches/train_step.py --model "$OUT/model" "${FLAGS[@]}")
    case $1 in
    samtrain) "${st[@]}" --model "$OUT/model" ;;
    samtrain-guided) "${st[@]}" --model "$OUT/model-guided" ;;
    hf-sdpa) "${hf[@]}" --attn sdpa ;;
    hf-eager) "${hf[@]}" --attn eager ;;
    hf-sdpa-text-logits) "${hf[@]}" --attn sdpa --text-logits-only ;;
    hf-sdpa-fused-adamw) "${hf[@]}" --attn sdpa --fused-adamw ;;
    # The C heap as samtrain sets it (src/allocator.rs), for transformers;
    # and samtrain with glibc's defaults.
    hf-sdpa-fused-adamw-malloc)
        MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
            "${hf[@]}" --attn sdpa --fused-adamw ;;
    samtrain-glibc-malloc) SAMTRAIN_MALLOC=glibc "${st[@]}" --model "$OUT/model" ;;
    samtrain-checkpointed) "${st[@]}" --model "$OUT/model" --activation-checkpointing ;;
    hf-sdpa-checkpointed) "${hf[@]}" --attn sdpa --gradient-checkpointing ;;
    samtrain-saving)
        "${st[@]}" --model "$OUT/model" --save-every "$SAVE_EVERY" --save-to "$SAVE_DIR/$1" ;;
    hf-sdpa-fused-adamw-saving)
        "${hf[@]}" --attn sdpa --fused-adamw --save-every "$SAVE_EVERY" --save-to "$SAVE_DIR/$1" ;;
    esac
}

# Percent of the CPU busy over one second, from /proc/stat.
busy_percent() {
    local a b
    read -ra a < <(head -1 /proc/stat)
    sleep 1
    read -ra b < <(head -1 /proc/stat)
    local total=0 idle=$((b[4] + b[5] - a[4] - a[5])) i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    echo $((100 * (total - idle) / (total > 0 ? total : 1)))
}

wait_for_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) busy
    while busy=$(busy_percent) && ((busy >= 15)); do
        if ((SECONDS >= deadline)); then
            echo "bench: CPU still ${busy}% busy after ${QUIET_WAIT} s; running anyway" >&2
            return
        fi
    done
}

: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for side in "${SIDES[@]}"; do
        wait_for_quiet
        echo "bench: round $round: $side" >&2
        run_side "$side" 2>>"$OUT/train_step.log" |
            "$PY" -c 'import json, sys; r = json.loads(sys.stdin.read()); r.update(round=int(sys.argv[1]), side=sys.argv[2]); print(json.dumps(r))' \
                "$round" "$side" >>"$RESULTS"
    done
done

"$PY" - "$RESULTS" <<'EOF'
import json, statistics, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
sides = list(dict.fromkeys(r["side"] for r in rows))
by = {(r["round"], r["side"]): r for r in rows}
rounds = sorted({r["round"] for r in rows})
first = by[(rounds[0], "samtrain")]
print(f"median ms per step over {first['steps']} steps; {first['threads']} threads, batch "
      f"{first['batch']} x {first['images']} image(s), text {first['text_len']}, "
      f"instruction {first['qformer_len']}")


# Every side but samtrain gets a ratio column: samtrain / transformers for the
# transformers sides (checkpointed against checkpointed), the cost of guidance or
# of checkpointing (samtrain-X / samtrain) for the other samtrain sides.
# The saving sides (against each other) by their mean step, which carries the
# saves; the others by their median.
def ratio(side, ms):
    if side.startswith("samtrain-"):
        return ms[side] / ms["samtrain"]
    mine = "samtrain-checkpointed" if side.endswith("-checkpointed") else "samtrain"
    mine = "samtrain-saving" if side.endswith("-saving") else mine
    return ms[mine] / ms[side]


def step_ms(side, row):
    return row["mean_ms"] if side.endswith("-saving") else row["median_ms"]


head = ["round"] + [c for s in sides for c in ([s] if s == "samtrain" else [s, "ratio"])]
widths = [max(len(h), 6) + 2 for h in head]


def line(label, ms):
    cells = [label]
    for s in sides:
        cells.append(f"{ms[s]:.0f}")
        if s != "samtrain":
            cells.append(f"{ratio(s, ms):.2f}")
    print("".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


print("".join(f"{h:>{w}}" for h, w in zip(head, widths)))
for n in rounds:
    line(str(n), {s: step_ms(s, by[(n, s)]) for s in sides})
line("median", {s: statistics.median(step_ms(s, by[(n, s)]) for n in rounds) for s in sides})
print("ratio: samtrain / transformers (checkpointed sides against each other, saving "
      "sides by their mean step); for the other samtrain sides: samtrain-X / samtrain")
if "samtrain-saving" in sides:
    print("a save of the trained state: its cost to training ((mean step saving - mean step "
          "not saving) x steps between saves) and the time it blocked training, ms:")
    for saving, plain in (("samtrain-saving", "samtrain"),
                          ("hf-sdpa-fused-adamw-saving", "hf-sdpa-fused-adamw")):
        every = by[(rounds[0], saving)]["save"]["every"]
        costs = [(by[(n, saving)]["mean_ms"] - by[(n, plain)]["mean_ms"]) * every for n in rounds]
        blocked = [by[(n, saving)]["save"]["blocked_ms"] for n in rounds]
        print(f"  {saving:<28} cost " + " ".join(f"{c:7.1f}" for c in costs)
              + f"  (median {statistics.median(costs):.1f});  blocked "
              + " ".join(f"{b:6.1f}" for b in blocked))
        # samtrain's saves lend the tensors to the upload: what settling the
        # loan before the next update took, and what it copied.
        settles = [by[(n, saving)]["save"].get("settle_ms") for n in rounds]
        if None not in settles:
            copied = [by[(n, saving)]["save"]["copied_bytes"] / 2**20 for n in rounds]
            print(f"  {'':<28} of which settling the loan "
                  + " ".join(f"{x:6.2f}" for x in settles) + ";  MiB copied then "
                  + " ".join(f"{c:6.1f}" for c in copied))
print("min ms per step, by round:")
for s in sides:
    print(f"  {s:<20}" + "".join(f"{by[(n, s)]['min_ms']:>8.0f}" for n in rounds))
print("medians of the phases over the rounds (ms):")
for s in sides:
    f, b, o = (statistics.median(by[(n, s)][p] for n in rounds) for p in ("forward_ms", "backward_ms", "optimizer_ms"))
    print(f"  {s:<20} forward {f:5.0f}  backward {b:5.0f}  optimizer {o:5.0f}")
print("first-step loss: " + ", ".join(f"{s} {by[(rounds[0], s)]['first_loss']:.6f}" for s in sides))
print("trained parameters: " + ", ".join(f"{s} {by[(rounds[0], s)]['parameters']}" for s in sides))
print("memory a step adds (peak resident minus resident before the first step), MiB, median over the rounds:")
for s in sides:
    added = statistics.median((by[(n, s)]["peak_rss_bytes"] - by[(n, s)]["rss_before_steps_bytes"]) / 2**20 for n in rounds)
    peak = statistics.median(by[(n, s)]["peak_rss_bytes"] / 2**20 for n in rounds)
    planned = by[(rounds[0], s)].get("planned_step_bytes")
    plan = f"   samtrain model plan expects {planned / 2**20:7.0f}" if planned else ""
    print(f"  {s:<22} adds {added:7.0f}   peak {peak:7.0f}{plan}")
EOF
