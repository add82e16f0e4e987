"""All-reduce bandwidth of PyTorch's Gloo backend between local processes.

The counterpart of `samtrain bench allreduce`: same sizes (f32), same
method (a correctness check of the sum first, then per size `--warmup`
untimed and `--iters` timed all-reduces, each after a barrier, median of
rank 0's times) and the same JSON line per size: bytes, time_us, algbw_gbps,
busbw_gbps (GB/s = 1e9 B/s; busbw = algbw * 2(n-1)/n as nccl-tests).

    python benches/allreduce_gloo.py --ranks 2 --bytes 1MiB,64MiB [--json]
"""

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
         "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text):
    t = text.strip()
    num = t[: len(t) - len(t.lstrip("0123456789"))]
    size = int(num) * UNITS[t[len(num):].strip().lower()]
    assert size > 0 and size % 4 == 0, f"{text}: a positive multiple of 4 bytes"
    return size


def worker(rank, args, port, sizes, queue):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.ranks)
    n = args.ranks
    for size in sizes:
        numel = size // 4
        base = torch.arange(numel, dtype=torch.float32).remainder(1000.0)
        x = base * (rank + 1.0)
        check = x.clone()
        dist.all_reduce(check)
        # Integers below 2^24 sum exactly in f32.
        assert torch.equal(check, base * (n * (n + 1) / 2)), "the all-reduce is not the sum"
        y = torch.empty_like(x)
        times = []
        for i in range(args.warmup + args.iters):
            y.copy_(x)  # Gloo reduces in place: restore the input, untimed.
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(y)
            took = time.perf_counter() - start
            if i >= args.warmup:
                times.append(took)
        median = statistics.median(times)
        algbw = size / median / 1e9
        if rank == 0:
            queue.put({"bytes": size, "time_us": median * 1e6, "algbw_gbps": algbw,
                       "busbw_gbps": algbw * 2 * (n - 1) / n, "ranks": n,
                       "backend": "gloo", "iters": args.iters})
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--bytes", default="1MiB,64MiB")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sizes = [parse_size(s) for s in args.bytes.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, port, sizes, queue))
             for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    if not args.json:
        print(f"all-reduce sum of f32, gloo backend, {args.ranks} local processes, "
              f"median of {args.iters} after {args.warmup} warm-up")
        print(f"{'bytes':>12} {'time_us':>12} {'algbw_gbps':>12} {'busbw_gbps':>12}")
    for _ in sizes:
        r = queue.get()
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['bytes']:>12} {r['time_us']:>12.1f} {r['algbw_gbps']:>12.3f} "
                  f"{r['busbw_gbps']:>12.3f}", flush=True)
    for pr in procs:
        pr.join()
        assert pr.exitcode == 0, f"a rank failed (exit {pr.exitcode})"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
