#!/usr/bin/env bash
# Saves and loads BYTES of f32 tensors with samtrain's checkpoints and with
# torch.save / torch.load, to the same local folder, ROUNDS times each, and
# prints a table (docs/PERFORMANCE.md, "Checkpoints vs torch.save").
#
# Environment: BYTES (1GiB), TENSORS (16), ROUNDS (3), REPEATS (3: the two
# sides alternate this many times, so that load from other processes spreads
# over both), DIR (target/bench/checkpoint), DEVICE (cpu; cuda: both sides
# save tensors from GPU memory and load them back onto it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BYTES=${BYTES:-1GiB}
TENSORS=${TENSORS:-16}
ROUNDS=${ROUNDS:-3}
REPEATS=${REPEATS:-3}
DIR=${DIR:-target/bench/checkpoint}
DEVICE=${DEVICE:-cpu}
PY=$ROOT/.venv/bin/python
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

echo "bench: cargo build --release" >&2
cargo build --release --bin samtrain

BYTES_N=$("$PY" - "$BYTES" <<'PYEOF'
import re, sys
m = re.fullmatch(r"([\d.]+)\s*([KMG]i?B|B)?", sys.argv[1].strip(), re.I)
units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
print(int(float(m.group(1)) * units[(m.group(2) or "").upper()]))
PYEOF
)

RESULTS=$(mktemp)
for ((i = 0; i < REPEATS; i++)); do
    rm -rf "$DIR"
    mkdir -p "$DIR"
    target/release/samtrain bench checkpoint --bytes "$BYTES_N" --tensors "$TENSORS" \
        --rounds "$ROUNDS" --device "$DEVICE" --url "file://$DIR/samtrain" --json 2>/dev/null >>"$RESULTS"
    "$PY" benches/checkpoint_torch.py --bytes "$BYTES_N" --tensors "$TENSORS" \
        --rounds "$ROUNDS" --device "$DEVICE" --dir "$DIR/torch" >>"$RESULTS"
done
rm -rf "$DIR"

"$PY" benches/checkpoint_table.py "$RESULTS"
rm -f "$RESULTS"
