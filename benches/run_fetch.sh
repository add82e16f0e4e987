#!/usr/bin/env bash
# Images per second a worker's loader delivers from a dataset in S3 (moto's
# server, on loopback), with an empty cache (cold) and with the cache the
# cold epoch filled (warm), beside the images per second a training step of
# the demo's model consumes (docs/PERFORMANCE.md, "Images from object
# storage").
#
# The dataset is the demo's task (`samtrain data synth --task group`, 96 px
# PNGs, IMAGES per sample), uploaded once; the spec reads it with the
# demo's loader settings except LOADER_THREADS. Each round runs one epoch
# cold (cache folder emptied), then one warm, each in its own process.
# moto answers on loopback in about a millisecond; a real bucket's latency
# is tens of milliseconds, which the loader threads' concurrency hides only
# in part, so the cold figure here is an upper bound.
#
# Environment: SAMPLES (512), IMAGES (3), LOADER_THREADS (2), ROUNDS (3),
# DIR (target/bench/fetch).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SAMPLES=${SAMPLES:-512}
IMAGES=${IMAGES:-3}
LOADER_THREADS=${LOADER_THREADS:-2}
ROUNDS=${ROUNDS:-3}
DIR=${DIR:-target/bench/fetch}
PY=$ROOT/.venv/bin/python
ST=target/release/samtrain

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain
rm -rf "$DIR"
mkdir -p "$DIR"
"$ST" data synth --task group --samples "$SAMPLES" --images "$IMAGES" --seed 3 --out "$DIR/data" >&2

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$DIR/moto.log" 2>&1 &
MOTO=$!
trap 'kill "$MOTO" 2>/dev/null || true' EXIT
export AWS_ENDPOINT=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
"$PY" - "$DIR/data" "$AWS_ENDPOINT" <<'PYEOF'
import pathlib, sys, time, boto3
root, endpoint = pathlib.Path(sys.argv[1]), sys.argv[2]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
for _ in range(100):
    try:
        s3.create_bucket(Bucket="bench")
        break
    except Exception:
        time.sleep(0.1)
for path in sorted(root.rglob("*")):
    if path.is_file():
        s3.upload_file(str(path), "bench", "data/" + str(path.relative_to(root)))
PYEOF

cat >"$DIR/job.toml" <<TOML
name = "fetch-bench"
[model]
path = "unused"
[data]
train = "s3://bench/data"
llm_tokenizer = "s3://bench/data/tokenizer.json"
loader_threads = $LOADER_THREADS
prefetch = 4
max_txt_len = 32
max_output_txt_len = 16
cache_dir = "$DIR/cache"
[training]
batch_size = 8
[checkpoint]
url = "$DIR/checkpoints"
TOML

# What a step of the demo's model consumes: batch 8 x IMAGES images.
"$ST" model init --config examples/demo-model.json --out "$DIR/model" >&2
"$ST" bench train-step --model "$DIR/model" --batch 8 --images "$IMAGES" --text-len 48 \
    --qformer-len 16 --threads 1 --steps 10 --warmup 2 --json >"$DIR/step.json"

: >"$DIR/fetch.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for cache in cold warm; do
        [[ $cache == cold ]] && rm -rf "$DIR/cache"
        echo "bench: round $round: $cache" >&2
        "$ST" bench fetch --spec "$DIR/job.toml" --image-size 48 |
            "$PY" -c 'import json, sys; r = json.loads(sys.stdin.read()); r.update(round=int(sys.argv[1]), mode=sys.argv[2]); print(json.dumps(r))' \
                "$round" "$cache" >>"$DIR/fetch.jsonl"
    done
done

"$PY" - "$DIR/fetch.jsonl" "$DIR/step.json" "$IMAGES" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
step = json.load(open(sys.argv[2]))
images = int(sys.argv[3])
consumed = 8 * images / (step["median_ms"] / 1e3)
print(f"dataset: {rows[0]['records']} samples, {rows[0]['images']} images, "
      f"{rows[0]['loader_threads']} loader threads")
print(f"a training step of the demo's model (1 thread, batch 8 x {images}) consumes "
      f"{consumed:.0f} images/s ({step['median_ms']:.0f} ms per step)")
for cache in ("cold", "warm"):
    rs = [r for r in rows if r["mode"] == cache]
    rates = [r["images_per_s"] for r in rs]
    print(f"{cache}: images/s by round " + ", ".join(f"{x:.0f}" for x in rates)
          + f"; median {statistics.median(rates):.0f} = {statistics.median(rates) / consumed:.1f}x "
          f"the step's consumption; fetched {rs[0]['cache']['fetched']} objects, "
          f"{rs[0]['cache']['hits']} cache hits, dataset read in {statistics.median(r['read_s'] for r in rs):.2f} s")
PYEOF
