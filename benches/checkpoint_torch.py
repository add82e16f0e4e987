"""torch.save / torch.load of the tensors `samtrain bench checkpoint` saves:
the same count and shapes of f32 tensors, to a file in a local folder; with
--device cuda the tensors live on the GPU and load back onto it.
Prints one JSON object with the medians of ROUNDS rounds
(docs/PERFORMANCE.md, "Checkpoints vs torch.save")."""

import argparse
import json
import os
import statistics
import time

import torch


def shapes(total_bytes, count):
    # As in src/bench_checkpoint.rs: rows of 1024 f32.
    rows = max(total_bytes // 4 // 1024 // count, 1)
    return [(rows, 1024)] * count


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tensors = {
        f"language_model.model.layers.{i}.mlp.up_proj.weight": torch.randn(s).to(args.device)
        for i, s in enumerate(shapes(args.bytes, args.tensors))
    }
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "checkpoint.pt")
    save, load = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        torch.save(tensors, path)
        save.append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = torch.load(path, map_location=args.device, weights_only=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        load.append(time.perf_counter() - start)
        assert len(loaded) == len(tensors)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    os.remove(path)
    save_ms = statistics.median(save) * 1e3
    load_ms = statistics.median(load) * 1e3
    print(json.dumps({
        "side": "torch",
        "device": args.device,
        "torch": torch.__version__,
        "bytes": total,
        "tensors": args.tensors,
        "rounds": args.rounds,
        # torch.save serialises and writes in the caller: training waits for all of it.
        "staging_ms": save_ms,
        "save_ms": save_ms,
        "save_gbps": total / 1e9 / (save_ms / 1e3),
        "load_ms": load_ms,
        "load_gbps": total / 1e9 / (load_ms / 1e3),
    }))


if __name__ == "__main__":
    main()
