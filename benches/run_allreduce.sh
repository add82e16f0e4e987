#!/usr/bin/env bash
# All-reduce of f32 tensors between 2 local processes: samtrain's ring
# (`samtrain bench allreduce`), through shared memory as ranks on one host
# use it and over TCP as ranks on different hosts do, against PyTorch's
# Gloo (benches/allreduce_gloo.py), same sizes, same method (in-place
# all-reduces of a buffer refilled, untimed, before each), printed side by
# side (docs/PERFORMANCE.md, "All-reduce vs Gloo"). On a shared machine run
# it as `nice -n -10 env ROUNDS=3 benches/run_allreduce.sh`.
#
# Builds samtrain in release mode, then runs the three sides alternately
# ROUNDS times so that load from other processes spreads over both, and
# reports per size the best of the rounds' medians for each side.
#
# Environment: RANKS (2), SIZES (1MiB,4MiB,16MiB,64MiB,256MiB), ITERS (10),
# WARMUP (3), ROUNDS (3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RANKS=${RANKS:-2}
SIZES=${SIZES:-1MiB,4MiB,16MiB,64MiB,256MiB}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-3}
PY=${SAMTRAIN_PYTHON:-$ROOT/.venv/bin/python}
OUT=target/bench
RESULTS=$OUT/allreduce.jsonl

echo "bench: cargo build --release --bin samtrain" >&2
cargo build --release --bin samtrain >&2
mkdir -p "$OUT"
: >"$RESULTS"

common=(--ranks "$RANKS" --bytes "$SIZES" --iters "$ITERS" --warmup "$WARMUP" --json)
for round in $(seq "$ROUNDS"); do
  echo "bench: round $round/$ROUNDS: samtrain ring (shared memory)" >&2
  target/release/samtrain bench allreduce --backend ring "${common[@]}" >>"$RESULTS"
  echo "bench: round $round/$ROUNDS: samtrain ring over TCP" >&2
  target/release/samtrain bench allreduce --backend ring-tcp "${common[@]}" >>"$RESULTS"
  echo "bench: round $round/$ROUNDS: gloo" >&2
  "$PY" benches/allreduce_gloo.py "${common[@]}" >>"$RESULTS"
done

"$PY" - "$RESULTS" <<'PYEOF'
import json, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["backend"], r["bytes"])
    if key not in best or r["time_us"] < best[key]["time_us"]:
        best[key] = r
sizes = sorted({b for _, b in best})
sides = [("ring", "shm"), ("ring-tcp", "tcp"), ("gloo", "gloo")]
print(f"{'bytes':>10} | " + " | ".join(f"{n + ' ms':>9} {n + ' busbw':>10}" for _, n in sides)
      + f" | {'gloo/shm':>9} {'gloo/tcp':>9}")
for b in sizes:
    r = {k: best[(k, b)] for k, _ in sides}
    print(f"{b:>10} | " + " | ".join(f"{r[k]['time_us']/1e3:>9.2f} {r[k]['busbw_gbps']:>10.3f}" for k, _ in sides)
          + f" | {r['gloo']['time_us']/r['ring']['time_us']:>8.2f}x {r['gloo']['time_us']/r['ring-tcp']['time_us']:>8.2f}x")
PYEOF
