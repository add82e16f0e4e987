#!/usr/bin/env python3
"""The transformers side of `samtrain bench train-step`: one training step of the same
model folder in Python transformers, timed the same way, for docs/PERFORMANCE.md.

It loads the folder with `InstructBlipForConditionalGeneration.from_pretrained` (which
ignores samtrain's `sam.safetensors` and the `samtrain` key of config.json), trains every
parameter with `torch.optim.AdamW(lr=1e-4, weight_decay=0.01)` and times forward +
backward + optimizer step + zero_grad, nothing else. The batch is drawn with the same
seed, shapes and order of draws as samtrain's, so both sides see the same numbers: with
guidance off the first-step losses agree, which checks that both time the same model.

N images per sample go through transformers as InstructBLIP does it: each image gets
its own Q-Former pass (with the sample's instruction) and `num_query_tokens` placeholder
tokens before the text, as HF's processor writes them; their labels are -100. That is
samtrain with guidance off.

Usage (flags as `samtrain bench train-step`):
  .venv/bin/python benches/train_step.py --model DIR --batch 4 --images 1 --text-len 64 \
      --qformer-len 16 --steps 10 --warmup 2 --threads 2 [--attn sdpa|eager] [--json]
--device cuda trains on the first GPU (the batch is drawn on the CPU, as samtrain's, then
moved); --autocast bf16|fp16 runs forward and loss under torch.autocast (AMP, weights and
AdamW fp32, no loss scaling), as `samtrain bench train-step --autocast`.
--gradient-checkpointing turns on transformers' activation checkpointing (in training
mode, dropout set to 0). Two variants, not the baseline: --text-logits-only (logits at the text positions only,
transformers' `logits_to_keep`; samtrain computes them at the supervised positions
only) and --fused-adamw (`AdamW(fused=True)`, one kernel for the whole update).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

# The model folder is local; never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import InstructBlipForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

IGNORE = -100
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=1, help="images per sample")
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--qformer-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--autocast", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attn_implementation")
    p.add_argument(
        "--text-logits-only",
        action="store_true",
        help="compute logits at the text positions only (logits_to_keep); same loss",
    )
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True)")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="transformers' gradient_checkpointing_enable() (samtrain's --activation-checkpointing)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="torch.save the model's and the optimizer's state_dict after every this many "
        "steps, into --save-to (the newest two kept), as samtrain's --save-every",
    )
    p.add_argument("--save-to", help="folder of --save-every's files")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args()
    assert args.steps > 0, "--steps must be positive"
    assert args.text_len >= 2, "--text-len must be at least 2 (half of it is supervised)"
    return args


def random_batch(model, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """samtrain's batch (src/bench/train_step.rs, random_batch), in transformers' layout,
    drawn on the CPU and moved to --device."""
    cfg = model.config
    b, n, nq = args.batch, args.images, cfg.num_query_tokens
    size = cfg.vision_config.image_size
    # Same generator, same draws in the same order as samtrain.
    torch.manual_seed(args.seed)
    pixel_values = torch.randn(b, n, 3, size, size)
    q_ids = torch.randint(3, cfg.qformer_config.vocab_size - 1, (b, args.qformer_len))
    text = torch.randint(3, cfg.text_config.vocab_size - 1, (b, args.text_len))
    text_labels = text.clone()
    text_labels[:, : args.text_len // 2] = IGNORE
    # Placeholders first, as the processor writes them; the model scatters the query
    # outputs of every image of a sample into its placeholders, in image order.
    placeholders = torch.full((b, n * nq), cfg.image_token_index, dtype=torch.int64)
    batch = {
        "pixel_values": pixel_values.reshape(b * n, 3, size, size),
        # One Q-Former pass per image, each with its sample's instruction.
        "qformer_input_ids": q_ids.repeat_interleave(n, dim=0),
        "input_ids": torch.cat([placeholders, text], dim=1),
        "labels": torch.cat([torch.full_like(placeholders, IGNORE), text_labels], dim=1),
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def synchronize(device: str) -> None:
    """On a GPU, waits for the queued kernels, so a clock read after it counts the work."""
    if device == "cuda":
        torch.cuda.synchronize()


def memory_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak so far) of this process, as samtrain reads them."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, info = InstructBlipForConditionalGeneration.from_pretrained(
        args.model, attn_implementation=args.attn, dtype=torch.float32, output_loading_info=True
    )
    # transformers only warns about tensors it did not find and initialises them
    # itself: a config it reads differently (say, a text_config without model_type,
    # which it takes for OPT) would silently benchmark another model.
    problems = {k: sorted(v) for k, v in info.items() if v}
    assert not problems, f"{args.model} does not load cleanly into transformers: {problems}"
    model.to(args.device)
    # eval(): samtrain has no dropout, and the Q-Former's (0.1 by default) would make
    # the two sides compute different functions. Gradients flow all the same.
    model.eval()
    if args.gradient_checkpointing:
        # transformers checkpoints only in training mode; dropout off keeps the
        # function the same as samtrain's.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=args.fused_adamw or None
    )
    batch = random_batch(model, args)
    rss_before_steps = memory_bytes("VmRSS")
    if args.text_logits_only:
        # The logits of the last text_len positions, the text, predict the text's
        # labels shifted by one; the one they drop, text token 0 (predicted by the
        # last visual token), is never supervised, so the loss is the same.
        batch["labels"] = batch["labels"][:, -args.text_len :]
        assert bool((batch["labels"][:, 0] == IGNORE).all())
        batch["logits_to_keep"] = args.text_len

    autocast_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    if args.save_every:
        assert args.save_to, "--save-every needs --save-to"
        # Files of an earlier run are removed; anything else is refused.
        if os.path.isdir(args.save_to):
            others = [f for f in os.listdir(args.save_to) if not (f.startswith("step-") and f.endswith(".pt"))]
            assert not others, f"--save-to {args.save_to} holds {others[0]}, which is not a save"
            shutil.rmtree(args.save_to)
        os.makedirs(args.save_to)
    forward, backward, optimizer, saving = [], [], [], []
    saved_files = []
    first_loss = None
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        synchronize(args.device)
        t_forward = time.perf_counter()
        loss.backward()
        synchronize(args.device)
        t_backward = time.perf_counter()
        opt.step()
        opt.zero_grad()
        synchronize(args.device)
        t_optimizer = time.perf_counter()
        if args.save_every and (step + 1) % args.save_every == 0:
            path = os.path.join(args.save_to, f"step-{step + 1}.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            saved_files.append(path)
            while len(saved_files) > 2:
                os.remove(saved_files.pop(0))
        done = time.perf_counter()
        # Read after the clock stops, as samtrain does.
        if first_loss is None:
            first_loss = loss.item()
        if step >= args.warmup:
            forward.append((t_forward - start) * 1e3)
            backward.append((t_backward - t_forward) * 1e3)
            optimizer.append((t_optimizer - t_backward) * 1e3)
            saving.append((done - t_optimizer) * 1e3)

    total = [f + b + o + s for f, b, o, s in zip(forward, backward, optimizer, saving)]
    result = {
        "device": args.device,
        "autocast": args.autocast,
        "median_ms": statistics.median(total),
        "mean_ms": statistics.mean(total),
        "min_ms": min(total),
        "steps": args.steps,
        "threads": args.threads,
        "batch": args.batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "images": args.images,
        "text_len": args.text_len,
        "qformer_len": args.qformer_len,
        "attn": args.attn,
        "text_logits_only": args.text_logits_only,
        "fused_adamw": args.fused_adamw,
        "forward_ms": statistics.median(forward),
        "backward_ms": statistics.median(backward),
        "optimizer_ms": statistics.median(optimizer),
        "first_loss": first_loss,
        "activation_checkpointing": args.gradient_checkpointing,
        "rss_before_steps_bytes": rss_before_steps,
        "peak_rss_bytes": memory_bytes("VmHWM"),
    }
    if args.save_every:
        timed_steps = range(args.warmup, args.warmup + args.steps)
        saves = [ms for ms, n in zip(saving, timed_steps) if (n + 1) % args.save_every == 0]
        assert saves, "no save was timed: --steps is too few for --save-every"
        result["save"] = {
            "every": args.save_every,
            "saves": len(saves),
            "blocked_ms": statistics.median(saves),
        }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"train step (transformers {transformers.__version__}, torch {torch.__version__}, "
        f"on {args.device}, autocast {args.autocast}, attn {args.attn}, text logits only {args.text_logits_only}, fused AdamW "
        f"{args.fused_adamw}): {result['parameters']} parameters, batch {args.batch} x "
        f"{args.images} image(s), text {args.text_len}, instruction {args.qformer_len}, "
        f"{args.threads} threads, {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"  median {result['median_ms']:.1f} ms, min {result['min_ms']:.1f} ms")
    print(
        f"  medians by phase: forward {result['forward_ms']:.1f} ms, backward "
        f"{result['backward_ms']:.1f} ms, optimizer {result['optimizer_ms']:.1f} ms"
    )
    print(f"  loss at the first step {first_loss:.6f}")


if __name__ == "__main__":
    main()
