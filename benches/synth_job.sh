#!/usr/bin/env bash
# Prints the job spec the data-parallel benchmarks share: a model initialised
# from DIR/model.json into DIR/model, a synthetic "group" set in DIR/data,
# CPU training that logs every step, checkpoints only at the end under RUN.
# Each OVERRIDE (`section.key=value`, the value in TOML, e.g.
# `data.synth.images=8` or `model.vision_cache="/tmp/v"`) sets or adds one
# key. Used by run_balance.sh, run_overlap.sh and run_vision_cache.sh.
#
# Usage: benches/synth_job.sh NAME DIR RUN STEPS BATCH WORKERS [OVERRIDE...]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/.venv/bin/python" - "$@" <<'PYEOF'
import json, sys, tomllib
name, root, run, steps, batch, workers, *overrides = sys.argv[1:]
job = {
    "": {"name": name},
    "model": {"path": f"{root}/model", "init": f"{root}/model.json"},
    "data": {"train": f"{root}/data", "llm_tokenizer": f"{root}/data/tokenizer.json",
             "loader_threads": 1, "max_txt_len": 32, "max_output_txt_len": 16,
             "augmentation": "none"},
    "data.synth": {"task": "group", "train_samples": 256, "images": 2, "seed": 3},
    "training": {"steps": int(steps), "batch_size": int(batch), "lr": 1e-4, "seed": 0,
                 "device": "cpu", "log_every": 1, "threads": 1},
    "parallel": {"min_workers": int(workers), "max_workers": int(workers)},
    "checkpoint": {"url": f"{run}/checkpoints", "every_steps": 1000000},
}
for o in overrides:
    path, value = o.split("=", 1)
    section, key = path.rsplit(".", 1)
    job[section][key] = tomllib.loads(f"v = {value}")["v"]
value = lambda v: str(v).lower() if isinstance(v, bool) else json.dumps(v)
for section, keys in job.items():
    if section:
        print(f"[{section}]")
    for k, v in keys.items():
        print(f"{k} = {value(v)}")
PYEOF
