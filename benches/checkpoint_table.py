#!/usr/bin/env python3
"""The table of benches/run_checkpoint.sh and benches/run_gpu.sh: the JSON lines of
`samtrain bench checkpoint --json` and benches/checkpoint_torch.py in one file, medians
by side. The speedup column is samtrain's speed over torch's: above 1, samtrain is faster.

Usage: checkpoint_table.py RESULTS.jsonl"""

import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
st = [r for r in rows if r["side"] == "samtrain"]
pt = [r for r in rows if r["side"] == "torch"]


def med(side, key):
    return statistics.median(r[key] for r in side)


print(f"{st[0]['bytes'] / 2**20:.0f} MiB in {st[0]['tensors']} f32 tensors on "
      f"{st[0].get('device', 'cpu')}, medians of {len(st)} runs of {st[0]['rounds']} rounds each")
print(f"{'':28}{'samtrain':>12}{'torch':>12}{'speedup':>10}")
for key, label in [("staging_ms", "training blocked (ms)"), ("save_ms", "save (ms)"),
                   ("load_ms", "load (ms)"), ("save_gbps", "save (GB/s)"), ("load_gbps", "load (GB/s)")]:
    a, b = med(st, key), med(pt, key)
    speedup = a / b if key.endswith("gbps") else b / a
    print(f"{label:28}{a:12.2f}{b:12.2f}{speedup:10.2f}")
print(f"{'samtrain latest() (ms)':28}{med(st, 'latest_ms'):12.1f}")
