"""The peer of `samtrain bench load`: one `from_pretrained` of a model folder in
a given dtype, printing seconds and the process's peak resident memory as JSON."""
import argparse
import json
import resource
import time

import torch
from transformers import InstructBlipForConditionalGeneration

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args()
    before = peak_rss_bytes()
    start = time.perf_counter()
    model = InstructBlipForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "impl": "transformers",
        "dtype": args.dtype,
        "parameters": params,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": before,
    }))


if __name__ == "__main__":
    main()
