#!/usr/bin/env bash
# The cost of committing a checkpoint at every step to S3 (moto's server, on
# loopback): `samtrain train` of the demo's model for STEPS steps with
# `checkpoint.every_steps = 1` and with one save at the end, alternating
# ROUNDS times; the difference of the wall times over STEPS is the cost per
# step. Beside it, what a torchrun script's usual every-step save costs:
# torch.save of the same bytes (trainable tensors and AdamW's two moments,
# as one samtrain step folder holds them) into a buffer and a boto3
# put_object, on the training thread (docs/PERFORMANCE.md, "Committing
# every step").
#
# Environment: STEPS (60), ROUNDS (3), DIR (target/bench/every-step).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STEPS=${STEPS:-60}
ROUNDS=${ROUNDS:-3}
DIR=${DIR:-target/bench/every-step}
PY=$ROOT/.venv/bin/python
ST=target/release/samtrain

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
rm -rf "$DIR"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
"$ST" data synth --task group --samples 512 --images 3 --seed 3 --out "$DIR/data" >&2
"$ST" model init --config examples/demo-model.json --out "$DIR/model" >&2

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$DIR/moto.log" 2>&1 &
MOTO=$!
trap 'kill "$MOTO" 2>/dev/null || true' EXIT
export AWS_ENDPOINT=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
"$PY" - "$AWS_ENDPOINT" <<'PYEOF'
import sys, time, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
for _ in range(100):
    try:
        s3.create_bucket(Bucket="bench")
        break
    except Exception:
        time.sleep(0.1)
PYEOF

# One spec per mode; the same data, model, steps and seed.
spec() {
    cat >"$DIR/$1.toml" <<TOML
name = "every-step-bench"
[model]
path = "$DIR/model"
[data]
train = "$DIR/data"
llm_tokenizer = "$DIR/data/tokenizer.json"
loader_threads = 1
prefetch = 4
max_txt_len = 32
max_output_txt_len = 16
augmentation = "none"
[training]
steps = $STEPS
batch_size = 8
lr = 1e-3
warmup_steps = 10
threads = 1
log_every = $STEPS
[checkpoint]
url = "s3://bench/$1-\$ROUND"
every_steps = $2
keep = 2
TOML
}
spec every 1
spec end "$STEPS"

: >"$DIR/runs.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for mode in every end; do
        sed "s/\\\$ROUND/$round/" "$DIR/$mode.toml" >"$DIR/run.toml"
        echo "bench: round $round: $mode" >&2
        start=$(date +%s%N)
        "$ST" train "$DIR/run.toml" --json >/dev/null 2>"$DIR/$mode-$round.log"
        end=$(date +%s%N)
        echo "{\"mode\": \"$mode\", \"round\": $round, \"seconds\": $(((end - start) / 1000000)).0e-3}" >>"$DIR/runs.jsonl"
    done
done

# The bytes of one step folder, and the torch peer with the same bytes.
"$PY" - "$DIR/runs.jsonl" "$AWS_ENDPOINT" "$STEPS" <<'PYEOF'
import io, json, statistics, sys, time
import boto3, torch
rows = [json.loads(l) for l in open(sys.argv[1])]
s3 = boto3.client("s3", endpoint_url=sys.argv[2], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
steps = int(sys.argv[3])
objects = s3.list_objects_v2(Bucket="bench", Prefix=f"every-1/step-{steps:08d}/")["Contents"]
folder = sum(o["Size"] for o in objects)
med = lambda mode: statistics.median(r["seconds"] for r in rows if r["mode"] == mode)
every, end = med("every"), med("end")
per_step_ms = (every - end) / (steps - 1) * 1e3
step_ms = end / steps * 1e3
# The peer: fp32 tensors of the folder's size (three equal parts: the
# trainable tensors and AdamW's two moments), saved and put every step.
n = folder // 4 // 3
state = {"params": torch.randn(n), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
times = []
for i in range(20):
    t0 = time.perf_counter()
    buf = io.BytesIO()
    torch.save(state, buf)
    s3.put_object(Bucket="bench", Key=f"torch/step-{i:08d}.pt", Body=buf.getvalue())
    times.append(time.perf_counter() - t0)
torch_ms = statistics.median(times) * 1e3
print(f"{steps} steps of the demo's model, 1 thread; a step folder holds {folder / 2**20:.2f} MiB "
      f"({len(objects)} objects); medians of {len(rows) // 2} runs each")
print(f"wall time: every step committed {every:.2f} s, one save at the end {end:.2f} s "
      f"({step_ms:.0f} ms per step)")
print(f"samtrain, committing every step: {per_step_ms:+.1f} ms per step "
      f"({per_step_ms / step_ms * 100:+.1f}% of a step)")
print(f"torch.save + put_object of the same bytes on the training thread: {torch_ms:.1f} ms per step "
      f"({torch_ms / step_ms * 100:.1f}% of a step)")
PYEOF
