#!/usr/bin/env bash
# The GPU checks and figures, in one run, on a machine with an NVIDIA GPU and
# PyTorch (python3 with torch, transformers and safetensors) but no Rust
# toolchain: the binaries come from benches/build_gpu.sh, built elsewhere
# against that machine's torch version and copied beside the tree (BIN).
#
#   1. The CUDA tests: libtorch's CUDA backend loaded and the GPU seen;
#      AdamW and gradient clipping against torch on the GPU, bit for bit
#      against `AdamW(fused=True)`; autocast in bf16 and fp16; gradient-ready
#      hooks on autograd's CUDA thread; a SAM training step under bf16
#      autocast against fp32; a checkpoint of GPU tensors (pinned staging).
#   2. One training step against transformers on the GPU, for the model of
#      benches/gpu_step_config.json (SAM's ViT-g width, BLIP-2's Q-Former,
#      four LLaMA-7B layers; 1.46 B parameters, all trained): fp32, and bf16
#      and fp16 autocast, fused AdamW on both sides.
#   3. Checkpoint save and load of BYTES from GPU memory, against
#      torch.save / torch.load.
#   4. The demo on one GPU (run second) (`samtrain demo --device "$DEVICE" --workers 1`): its
#      scores, and the predictions a user would read.
#
# Each part writes under OUT_DIR and a failing part does not stop the
# others; the exit status is 1 if any failed.
#
# Environment: BIN (target/gpu), OUT_DIR (target/gpu-results), WORK (a
# scratch folder, /tmp/samtrain-gpu), PY (python3), STEPS (10), BYTES (1GiB),
# DEMO_TIMEOUT (240 s); PARTS (all: "cuda-tests demo train-step checkpoint");
# DEVICE (cuda) and CONFIG (benches/gpu_step_config.json)
# to try the script on a CPU with a small model.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BIN=${BIN:-target/gpu}
OUT_DIR=${OUT_DIR:-target/gpu-results}
WORK=${WORK:-/tmp/samtrain-gpu}
PY=${PY:-python3}
STEPS=${STEPS:-10}
BYTES=${BYTES:-1GiB}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-240}
PARTS=${PARTS:-cuda-tests demo train-step checkpoint}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-benches/gpu_step_config.json}
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
FAILED=()

say() { echo "run_gpu: $*" >&2; }
# Runs a part, logging to OUT_DIR/<name>.log; notes a failure and goes on.
part() {
    local name=$1
    shift
    [[ " $PARTS " == *" $name "* ]] || return 0
    say "$name"
    local start=$SECONDS
    if "$@" >"$OUT_DIR/$name.log" 2>&1; then
        say "$name: ok in $((SECONDS - start)) s"
    else
        say "$name: FAILED (exit $?) after $((SECONDS - start)) s; last lines:"
        tail -20 "$OUT_DIR/$name.log" >&2
        FAILED+=("$name")
    fi
}

# libtorch is the one of this machine's torch; NCCL that of its wheel.
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
NCCL_LIB=$("$PY" -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$TORCH_LIB${NCCL_LIB:+:$NCCL_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export SAMTRAIN_PYTHON=$(command -v "$PY")
SAMTRAIN=$ROOT/$BIN/samtrain

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    echo "samtrain built for libtorch $(cat "$BIN/torch-version")"
    nproc
} >"$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt" >&2

# --- 1. CUDA tests (each skips on the CPU-only machines CI runs on)
cuda_tests() {
    local out
    out=$("$BIN/test-cuda" --nocapture 2>&1 &&
        "$BIN/test-ops" --test-threads 1 --nocapture cuda 2>&1 &&
        "$BIN/test-optim" --test-threads 1 --nocapture cuda 2>&1 &&
        "$BIN/test-precision" --test-threads 1 --nocapture on_cuda 2>&1 &&
        "$BIN/test-local" --test-threads 1 --nocapture gpu_tensors 2>&1)
    local status=$?
    echo "$out"
    # A test that found no GPU passes after a message: here that is a failure.
    ((status == 0)) && ! grep -Eq "skipped: no CUDA|no GPU here" <<<"$out" &&
        [[ $(grep -c "test result: ok. [1-9]" <<<"$out") == 5 ]]
}

# --- 2. training step against transformers
train_step() {
    rm -rf "$WORK/model"
    "$SAMTRAIN" model init --config "$CONFIG" --out "$WORK/model" || return
    local flags=(--batch 8 --images 1 --text-len 128 --qformer-len 32 --steps "$STEPS"
        --warmup 3 --threads 8 --device "$DEVICE" --json)
    local precision
    : >"$OUT_DIR/train_step.jsonl"
    for precision in off bf16 fp16; do
        "$SAMTRAIN" bench train-step --model "$WORK/model" "${flags[@]}" --autocast "$precision" |
            tail -1 | "$PY" -c 'import json, sys; r = json.load(sys.stdin); r["side"] = "samtrain"; print(json.dumps(r))' \
            >>"$OUT_DIR/train_step.jsonl" || return
        "$PY" benches/train_step.py --model "$WORK/model" "${flags[@]}" --autocast "$precision" \
            --attn sdpa --fused-adamw |
            "$PY" -c 'import json, sys; r = json.load(sys.stdin); r["side"] = "transformers"; print(json.dumps(r))' \
            >>"$OUT_DIR/train_step.jsonl" || return
    done
    "$PY" - "$OUT_DIR/train_step.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["side"], r["autocast"]): r for r in rows}
r0 = rows[0]
print(f"train step on {r0['device']}, {r0['parameters'] / 1e9:.2f} B parameters all trained, batch "
      f"{r0['batch']} x {r0['images']} image, text {r0['text_len']}; median of {r0['steps']} steps "
      "(transformers: sdpa, AdamW(fused=True))")
print(f"{'autocast':10}{'samtrain ms':>13}{'transformers ms':>17}{'speedup':>9}"
      f"{'fwd/bwd/opt samtrain':>26}{'fwd/bwd/opt transformers':>28}{'loss s/t':>20}")
for p in ["off", "bf16", "fp16"]:
    s, t = by.get(("samtrain", p)), by.get(("transformers", p))
    if not (s and t):
        continue
    phases = lambda r: f"{r['forward_ms']:.1f}/{r['backward_ms']:.1f}/{r['optimizer_ms']:.1f}"
    print(f"{p:10}{s['median_ms']:13.1f}{t['median_ms']:17.1f}{t['median_ms'] / s['median_ms']:9.2f}"
          f"{phases(s):>26}{phases(t):>28}{s['first_loss']:>10.4f}{t['first_loss']:>10.4f}")
PYEOF
}

# --- 3. checkpoints from GPU memory
checkpoints() {
    local bytes repeat
    bytes=$("$PY" -c 'import sys, re; m = re.fullmatch(r"(\d+)([KMG]iB)?", sys.argv[1]); print(int(m.group(1)) * {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)])' "$BYTES")
    : >"$OUT_DIR/checkpoint.jsonl"
    for repeat in 1 2; do
        rm -rf "$WORK/ck"
        "$SAMTRAIN" bench checkpoint --bytes "$bytes" --rounds 3 --device "$DEVICE" \
            --url "file://$WORK/ck/samtrain" --json >>"$OUT_DIR/checkpoint.jsonl" || return
        "$PY" benches/checkpoint_torch.py --bytes "$bytes" --rounds 3 --device "$DEVICE" \
            --threads 8 --dir "$WORK/ck/torch" >>"$OUT_DIR/checkpoint.jsonl" || return
    done
    rm -rf "$WORK/ck"
    "$PY" benches/checkpoint_table.py "$OUT_DIR/checkpoint.jsonl"
}

# --- 4. the demo on one GPU
demo() {
    timeout "$DEMO_TIMEOUT" "$SAMTRAIN" demo --device "$DEVICE" --workers 1 --fresh \
        --out "$WORK/demo" || return
    cp "$WORK/demo/eval/pred.json" "$OUT_DIR/demo-pred.json"
}

# The demo before the figures: it is the check a user's job depends on.
part cuda-tests cuda_tests
part demo demo
part train-step train_step
part checkpoint checkpoints

say "results in $OUT_DIR"
for f in demo train-step checkpoint; do
    [[ -f $OUT_DIR/$f.log ]] || continue
    echo "== $f" >&2
    tail -12 "$OUT_DIR/$f.log" >&2
done
if ((${#FAILED[@]})); then
    say "failed: ${FAILED[*]}"
    exit 1
fi
