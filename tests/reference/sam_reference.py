#!/usr/bin/env python3
"""Python reference for the Rust SAM model (InstructBLIP + bidirectional semantic guidance).

The Rust port is tested against the numbers this script writes: same checkpoint, same
inputs, same logits / loss / gradients / generated tokens.  Everything runs in float32 on
the CPU with eager attention, offline, and is seeded, so a given command line always
writes the same files.

Subcommands (see README.md next to this file for the file formats):

  make-checkpoint  tiny random InstructBLIP (HF layout) + sam.safetensors
  make-inputs      random batch of multi-image samples in the Rust model's input format
  forward          reference logits in the Rust sequence layout, with self-checks
  loss-grad        loss and gradients of the trainable tensors
  generate         beam / greedy generation through HF's generate()

The SAM guidance is re-implemented here on top of transformers' own modules (vision
encoder, Q-Former layers, projection, Llama), following SAM's public code
(McCartney01/SAM, sam/models/sam/Qformer.py, BertEncoder.forward): the W-former is a
second pass through the same Q-Former layers that cross-attends to the fused image
context, and the two streams exchange information only at the last layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Never touch the network: the checkpoint is always a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SAM_FILE = "sam.safetensors"
IGNORE = -100
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0

# Tolerances of the internal self-checks (float32; these paths differ only in op order).
TOL_EXPLICIT_VS_HF = 1e-5
TOL_LAYOUT = 1e-4
TOL_LOSS = 1e-5
TOL_GRAD = 1e-5  # relative to each tensor's largest gradient

# ---------------------------------------------------------------------------------------
# Tiny model variants.  `mha` is the plain case; `gqa` exercises grouped KV heads, a
# Q-Former with cross-attention in every layer, odd vocab sizes, 5 query tokens and a
# non-default RoPE theta, so that shape or config plumbing mistakes in the port show up.
# ---------------------------------------------------------------------------------------
_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    qkv_bias=True,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
)
_QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    cross_attention_frequency=2,
    encoder_hidden_size=32,
    vocab_size=67,
    max_position_embeddings=64,
    layer_norm_eps=1e-12,  # BERT's value, as in the real InstructBLIP Q-Former
    pad_token_id=PAD_ID,
    hidden_act="gelu",
)
_TEXT = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=96,
    vocab_size=101,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    hidden_act="silu",
    # transformers 5 LlamaConfig has no `rope_theta` field: RoPE lives in rope_parameters.
    # (Real hub checkpoints written by transformers 4 carry a flat "rope_theta" instead.)
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

VARIANTS = {
    "mha": dict(vision=_VISION, qformer=_QFORMER, text=_TEXT, num_query_tokens=4),
    "gqa": dict(
        vision=_VISION,
        qformer={**_QFORMER, "num_hidden_layers": 4, "cross_attention_frequency": 1, "vocab_size": 53},
        text={
            **_TEXT,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,  # hidden 48 / 6 heads -> head_dim 8
            "vocab_size": 89,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        },
        num_query_tokens=5,
    ),
}

# SAM's own tensors, in nn.Linear layout (weight [out, in], y = x W^T + b).
SAM_NAMES = (
    "sam.adaptive_adjustment.weight",  # [1, V]  score_j = Linear(V -> 1)(E_j)
    "sam.adaptive_adjustment.bias",  # [1]
    "sam.one_2_multiple.weight",  # [Q, Q]  Q-Former stream -> W-former stream
    "sam.one_2_multiple.bias",  # [Q]
    "sam.multiple_2_one.weight",  # [Q, Q]  W-former stream -> Q-Former stream
    "sam.multiple_2_one.bias",  # [Q]
)
EXCHANGE_NAMES = SAM_NAMES[2:]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# make-checkpoint
# ---------------------------------------------------------------------------------------
def build_config(variant: str) -> InstructBlipConfig:
    v = VARIANTS[variant]
    text = LlamaConfig(**v["text"])
    return InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**v["vision"]),
        qformer_config=InstructBlipQFormerConfig(**v["qformer"]),
        text_config=text,
        num_query_tokens=v["num_query_tokens"],
        # The last text id is reserved as the image placeholder (never a real token).
        image_token_index=text.vocab_size - 1,
    )


@torch.no_grad()
def randomise_parameters(model: torch.nn.Module, g: torch.Generator) -> None:
    """Re-draw every parameter at a moderate scale.

    transformers' own init zeroes query_tokens and all biases and sets norms to exactly 1,
    which would let a port that drops a bias, a norm weight or the query tokens pass.
    Linear weights use std 0.1 (not 0.02) so that attention is not nearly uniform and
    logits are spread enough for greedy/beam choices not to hinge on rounding.
    """

    def randn_like(p: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(p.shape, generator=g, dtype=p.dtype)

    done = set()
    for mod_name, module in model.named_modules():
        kind = type(module).__name__
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full == "query_tokens":
                p.copy_(randn_like(p, 0.5))
            elif isinstance(module, torch.nn.LayerNorm) or kind.endswith("RMSNorm"):
                p.copy_(randn_like(p, 0.1, 1.0) if p_name == "weight" else randn_like(p, 0.05))
            elif isinstance(module, torch.nn.Embedding):
                p.copy_(randn_like(p, 0.1))
            elif p_name in ("class_embedding", "position_embedding"):
                p.copy_(randn_like(p, 0.1))
            elif p_name == "bias":
                p.copy_(randn_like(p, 0.05))
            elif p_name == "weight":
                p.copy_(randn_like(p, 0.1))
            else:
                raise RuntimeError(f"no init rule for parameter {full} ({kind})")
            done.add(full)
        # The vision qkv bias is stored as cat(q_bias, 0, v_bias): EVA-CLIP has no key
        # bias, and real checkpoints carry exact zeros there.  Keep that structure.
        if kind == "InstructBlipAttention" and module.qkv.bias is not None:
            e = module.embed_dim
            module.qkv.bias[e : 2 * e].zero_()
    missing = {n for n, _ in model.named_parameters()} - done
    assert not missing, f"parameters left un-initialised: {sorted(missing)}"


def make_sam_tensors(config: InstructBlipConfig, guidance: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    v = config.vision_config.hidden_size
    q = config.qformer_config.hidden_size
    t = {
        "sam.adaptive_adjustment.weight": 0.1 * torch.randn(1, v, generator=g),
        "sam.adaptive_adjustment.bias": 0.1 * torch.randn(1, generator=g),
        "sam.one_2_multiple.weight": 0.1 * torch.randn(q, q, generator=g),
        "sam.one_2_multiple.bias": 0.1 * torch.randn(q, generator=g),
        "sam.multiple_2_one.weight": 0.1 * torch.randn(q, q, generator=g),
        "sam.multiple_2_one.bias": 0.1 * torch.randn(q, generator=g),
    }
    if guidance == "zero":
        # SAM zero-initialises the exchange Linears, so at initialisation SAM == InstructBLIP.
        for name in EXCHANGE_NAMES:
            t[name].zero_()
    return {k: v.contiguous() for k, v in t.items()}


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    g = seed_everything(args.seed)
    config = build_config(args.variant)
    model = InstructBlipForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.eval()
    randomise_parameters(model, g)
    if args.image_token_id_zero_row:
        # The placeholder's logit is then exactly 0 everywhere, and HF's repetition
        # penalty (which also hits the placeholder ids in the prompt) leaves 0 unchanged.
        with torch.no_grad():
            model.language_model.lm_head.weight[config.image_token_index].zero_()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors (its save_pretrained has no
    # safe_serialization flag any more).
    model.save_pretrained(out)
    # The SAM tensors get their own generator so that the HF weights do not depend on
    # --guidance (zero and random checkpoints of one seed share all HF weights).
    g_sam = torch.Generator().manual_seed(args.seed + 1_000_003)
    sam = make_sam_tensors(config, args.guidance, g_sam)
    # A single metadata key: safetensors writes a multi-key map in random order, which
    # would make the file's bytes differ from run to run.
    save_file(sam, str(out / SAM_FILE), metadata={"guidance": args.guidance})
    for f in sorted(out.iterdir()):
        print(f"{f}  {f.stat().st_size} bytes")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def load_model(
    model_dir: str, dtype: torch.dtype = torch.float32
) -> tuple[InstructBlipForConditionalGeneration, dict[str, torch.Tensor]]:
    model = InstructBlipForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation="eager", dtype=dtype
    )
    model.eval()
    sam_path = Path(model_dir) / SAM_FILE
    if sam_path.exists():
        sam = load_file(str(sam_path))
        assert set(sam) == set(SAM_NAMES), f"{sam_path}: expected tensors {SAM_NAMES}, got {sorted(sam)}"
    else:
        # No SAM file: plain InstructBLIP (zero exchange; the fusion weights are then unused).
        cfg = model.config
        sam = make_sam_tensors(cfg, "zero", torch.Generator().manual_seed(0))
        sam["sam.adaptive_adjustment.weight"].zero_()
        sam["sam.adaptive_adjustment.bias"].zero_()
    return model, {k: v.float() for k, v in sam.items()}


def exchange_is_zero(sam: dict[str, torch.Tensor]) -> bool:
    return all(bool((sam[n] == 0).all()) for n in EXCHANGE_NAMES)


def zero_exchange(sam: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (torch.zeros_like(v) if k in EXCHANGE_NAMES else v) for k, v in sam.items()}


@dataclass
class Sample:
    """One sample cut out of the batch: only its real images, only its real text."""

    pixel_values: torch.Tensor  # [N_b, 3, H, W]
    qformer_input_ids: torch.Tensor  # [1, Tq]
    qformer_attention_mask: torch.Tensor  # [1, Tq]
    input_ids: torch.Tensor  # [1, T]  (full padded row; attention_mask marks the real part)
    attention_mask: torch.Tensor  # [1, T]
    labels: torch.Tensor | None  # [1, T]
    n_images: int
    text_len: int


def load_inputs(path: str) -> dict[str, torch.Tensor]:
    t = load_file(path)
    for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask"):
        assert k in t, f"{path}: missing tensor {k}"
    b, n = t["pixel_values"].shape[:2]
    if "image_mask" not in t:
        t["image_mask"] = torch.ones(b, n, dtype=torch.int64)
    im = t["image_mask"]
    for i in range(b):
        k = int(im[i].sum())
        assert k >= 1, f"sample {i} has no real image"
        assert bool((im[i, :k] == 1).all()) and bool((im[i, k:] == 0).all()), (
            f"sample {i}: real images must come first in image_mask, got {im[i].tolist()}"
        )
        m = t["attention_mask"][i]
        L = int(m.sum())
        assert bool((m[:L] == 1).all()) and bool((m[L:] == 0).all()), f"sample {i}: text padding must be on the right"
    t["pixel_values"] = t["pixel_values"].float()
    return t


def get_sample(t: dict[str, torch.Tensor], b: int) -> Sample:
    n_b = int(t["image_mask"][b].sum())
    return Sample(
        pixel_values=t["pixel_values"][b, :n_b],
        qformer_input_ids=t["qformer_input_ids"][b : b + 1],
        qformer_attention_mask=t["qformer_attention_mask"][b : b + 1],
        input_ids=t["input_ids"][b : b + 1],
        attention_mask=t["attention_mask"][b : b + 1],
        labels=t["labels"][b : b + 1] if "labels" in t else None,
        n_images=n_b,
        text_len=int(t["attention_mask"][b].sum()),
    )


# ---------------------------------------------------------------------------------------
# The SAM visual tokens, written out on top of transformers' modules
# ---------------------------------------------------------------------------------------
def additive_padding_mask(mask2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, S] 0/1 -> [b, 1, 1, S] additive mask (0 = visible, finfo.min = hidden).

    This is what create_bidirectional_mask gives the eager Q-Former (it materialises it
    as [b, 1, S, S]; every query row is identical, so broadcasting one row is the same).
    """
    hidden = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(mask2d[:, None, None, :].bool(), torch.zeros((), dtype=dtype), hidden)


def sam_visual_tokens(model, sam: dict[str, torch.Tensor], s: Sample) -> torch.Tensor:
    """SAM visual tokens of one sample: [1, N_b * num_query_tokens, D_text].

    Follows SAM's BertEncoder.forward: both streams start from the same embedding
    output; the W-former stream runs the *same* layers with cross-attention to the fused
    context I_hat; at the last layer the Q-Former stream is added into the W-former
    stream (one_2_multiple), the W-former runs that layer, and its output is added back
    into the Q-Former stream (multiple_2_one) before the Q-Former's own last layer.
    With zero exchange weights this is exactly InstructBLIP applied to each image.
    """
    n = s.n_images
    nq = model.config.num_query_tokens
    # E_j: post-layernorm patch features (what InstructBLIP's Q-Former cross-attends to).
    e = model.vision_model(pixel_values=s.pixel_values).last_hidden_state  # [N_b, P, V]

    # Adaptive adjustment: per-patch score, softmax over the image axis (real images only).
    score = F.linear(e, sam["sam.adaptive_adjustment.weight"], sam["sam.adaptive_adjustment.bias"])  # [N_b,P,1]
    weights = torch.softmax(score, dim=0)
    i_hat = (weights * e).sum(dim=0, keepdim=True)  # [1, P, V]: one fused context per sample
    i_hat = i_hat.expand(n, -1, -1)

    qf = model.qformer
    q_ids = s.qformer_input_ids.expand(n, -1)
    q_mask = torch.cat(
        [torch.ones(n, nq, dtype=s.qformer_attention_mask.dtype), s.qformer_attention_mask.expand(n, -1)], dim=1
    )
    # Queries first, then the instruction tokens (InstructBLIP feeds the instruction too).
    h0 = qf.embeddings(input_ids=q_ids, query_embeds=model.query_tokens.expand(n, -1, -1))
    self_mask = additive_padding_mask(q_mask, h0.dtype)

    def run(layer, hidden, enc):
        # Cross-attention mask None = every image patch visible (HF passes all-ones).
        return layer(hidden, self_mask, enc, encoder_attention_mask=None, query_length=nq)

    layers = qf.encoder.layer
    h, w = h0, h0
    for layer in layers[:-1]:
        h = run(layer, h, e)  # Q-Former stream: its own image
        w = run(layer, w, i_hat)  # W-former stream: the fused context, same weights
    last = layers[-1]
    # The exchange covers the whole sequence (queries and instruction tokens), as in SAM.
    w = w + F.linear(h, sam["sam.one_2_multiple.weight"], sam["sam.one_2_multiple.bias"])
    w_out = run(last, w, i_hat)
    h = h + F.linear(w_out, sam["sam.multiple_2_one.weight"], sam["sam.multiple_2_one.bias"])
    h = run(last, h, e)

    tokens = model.language_projection(h[:, :nq])  # [N_b, Q, D]
    return tokens.reshape(1, n * nq, tokens.shape[-1])  # images in order, 32 (Q) tokens each


def text_embeds(model, s: Sample) -> torch.Tensor:
    return model.get_input_embeddings()(s.input_ids)


def llm_logits(model, visual: torch.Tensor, s: Sample) -> torch.Tensor:
    """Logits [1, N_b*Q + T, V] for [visual tokens, text] with the per-sample mask."""
    embeds = torch.cat([visual, text_embeds(model, s)], dim=1)
    mask = torch.cat([torch.ones(1, visual.shape[1], dtype=s.attention_mask.dtype), s.attention_mask], dim=1)
    return model.language_model(inputs_embeds=embeds, attention_mask=mask).logits


def image_placeholders(model, n_images: int) -> torch.Tensor:
    nq = model.config.num_query_tokens
    return torch.full((1, n_images * nq), model.config.image_token_index, dtype=torch.int64)


def hf_logits(model, s: Sample) -> torch.Tensor:
    """InstructBLIP through transformers' own code paths (valid for zero exchange only)."""
    if s.n_images == 1:
        ids = torch.cat([image_placeholders(model, 1), s.input_ids], dim=1)
        mask = torch.cat([torch.ones(1, model.config.num_query_tokens, dtype=torch.int64), s.attention_mask], dim=1)
        return model(
            pixel_values=s.pixel_values,
            qformer_input_ids=s.qformer_input_ids,
            qformer_attention_mask=s.qformer_attention_mask,
            input_ids=ids,
            attention_mask=mask,
        ).logits
    return llm_logits(model, hf_visual_tokens(model, s), s)


def hf_visual_tokens(model, s: Sample) -> torch.Tensor:
    n = s.n_images
    feats = model.get_image_features(
        s.pixel_values,
        qformer_input_ids=s.qformer_input_ids.expand(n, -1),
        qformer_attention_mask=s.qformer_attention_mask.expand(n, -1),
    ).pooler_output  # [N_b, Q, D]
    return feats.reshape(1, n * feats.shape[1], feats.shape[2])


def check_close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    d = float((a - b).abs().max()) if a.numel() else 0.0
    assert d <= tol, f"self-check '{name}' failed: max |diff| = {d:.3e} > {tol:.0e}"
    return d


def check_explicit_matches_hf(model, sam, s: Sample, b: int) -> None:
    """Validates the explicit SAM code: with the exchange zeroed it must be InstructBLIP."""
    explicit = llm_logits(model, sam_visual_tokens(model, zero_exchange(sam), s), s)
    d = check_close(f"explicit SAM (zero exchange) == HF, sample {b}", explicit, hf_logits(model, s), TOL_EXPLICIT_VS_HF)
    log(f"  sample {b}: explicit path (zero exchange) vs HF path: max |diff| {d:.2e}")


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------
def layout_logits(model, t: dict[str, torch.Tensor], visual: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """The Rust model's batched layout, run through HF's Llama, used as a self-check.

    [slot 0 | slot 1 | ... | slot N-1 | text], padding slots filled with garbage tokens
    (they must be masked out), mask = cat(image_mask repeated Q times, attention_mask),
    position ids = cumsum(mask) - 1 clamped at 0 (padding slots take no position).
    """
    b, n = t["image_mask"].shape
    nq = model.config.num_query_tokens
    d = model.config.text_config.hidden_size
    slots = torch.randn(b, n * nq, d, generator=g) * 3.0
    for i, v in enumerate(visual):
        slots[i, : v.shape[1]] = v[0]
    embeds = torch.cat([slots, model.get_input_embeddings()(t["input_ids"])], dim=1)
    mask = torch.cat([t["image_mask"].repeat_interleave(nq, dim=1), t["attention_mask"]], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits


@torch.no_grad()
def cmd_forward(args: argparse.Namespace) -> None:
    if args.dtype == "bf16":
        return forward_bf16(args)
    g = seed_everything(0)
    model, sam = load_model(args.model)
    t = load_inputs(args.inputs)
    bsz, n_slots = t["image_mask"].shape
    nq = model.config.num_query_tokens
    seq = n_slots * nq + t["input_ids"].shape[1]
    vocab = model.config.text_config.vocab_size
    zero = exchange_is_zero(sam)

    logits = torch.zeros(bsz, seq, vocab, dtype=torch.float32)
    valid = torch.zeros(bsz, seq, dtype=torch.int64)
    visual_all = []
    for b in range(bsz):
        s = get_sample(t, b)
        check_explicit_matches_hf(model, sam, s, b)
        if zero:
            # SAM at initialisation == InstructBLIP per image: take transformers' own path.
            out = hf_logits(model, s)
            visual = hf_visual_tokens(model, s)
        else:
            visual = sam_visual_tokens(model, sam, s)
            out = llm_logits(model, visual, s)
        visual_all.append(visual)
        k = s.n_images * nq
        logits[b, :k] = out[0, :k]
        logits[b, n_slots * nq :] = out[0, k:]
        valid[b, :k] = 1
        valid[b, n_slots * nq :] = s.attention_mask[0]
        # Positions that are not real stay 0 in `logits`: their values in the Rust model
        # are meaningless (masked slots, right padding) and must not be compared.
        logits[b] *= valid[b, :, None]

    d = check_close(
        "Rust layout (batched, masked slots, cumsum positions) == per-sample reference",
        layout_logits(model, t, visual_all, g) * valid[..., None],
        logits,
        TOL_LAYOUT,
    )
    log(f"  batched Rust layout vs per-sample reference (valid positions): max |diff| {d:.2e}")
    save_file({"logits": logits.contiguous(), "valid": valid}, args.out)
    log(f"wrote {args.out}: logits {list(logits.shape)}, valid {list(valid.shape)} "
        f"({int(valid.sum())} valid), exchange {'zero' if zero else 'non-zero'}")


def forward_bf16(args: argparse.Namespace) -> None:
    """transformers' own logits with every weight in bfloat16 (SAM at initialisation only),
    as float32 in the Rust layout: what reduced precision costs the reference."""
    seed_everything(0)
    model, sam = load_model(args.model, torch.bfloat16)
    assert exchange_is_zero(sam), "--dtype bf16 compares SAM at initialisation only"
    t = load_inputs(args.inputs)
    t["pixel_values"] = t["pixel_values"].to(torch.bfloat16)
    bsz, n_slots = t["image_mask"].shape
    nq = model.config.num_query_tokens
    seq = n_slots * nq + t["input_ids"].shape[1]
    logits = torch.zeros(bsz, seq, model.config.text_config.vocab_size, dtype=torch.float32)
    for b in range(bsz):
        s = get_sample(t, b)
        out = hf_logits(model, s).float()
        k = s.n_images * nq
        logits[b, :k] = out[0, :k]
        logits[b, n_slots * nq :] = out[0, k:]
    save_file({"logits": logits.contiguous()}, args.out)
    log(f"wrote {args.out}: bf16 logits {list(logits.shape)}")


# ---------------------------------------------------------------------------------------
# loss-grad
# ---------------------------------------------------------------------------------------
def cmd_loss_grad(args: argparse.Namespace) -> None:
    seed_everything(0)
    model, sam = load_model(args.model)
    t = load_inputs(args.inputs)
    assert "labels" in t, f"{args.inputs}: loss-grad needs a `labels` tensor"
    bsz, n_slots = t["image_mask"].shape
    nq = model.config.num_query_tokens

    train_all = args.trainable == "all"
    for p in model.parameters():
        p.requires_grad_(train_all)
    sam = {k: v.clone().requires_grad_(True) for k, v in sam.items()}

    total = torch.zeros(())
    count = 0
    for b in range(bsz):
        s = get_sample(t, b)
        if s.n_images < n_slots and int(s.labels[0, 0]) != IGNORE:
            # In the Rust layout text token 0 is preceded by a masked padding slot; the
            # reference predicts it from the last *real* visual token instead.
            log(f"  warning: sample {b} has padding slots and a supervised first text token")
        visual = sam_visual_tokens(model, sam, s)  # always the explicit SAM path here
        logits = llm_logits(model, visual, s)[0]
        labels = torch.cat([torch.full((s.n_images * nq,), IGNORE, dtype=torch.int64), s.labels[0]])
        # Token i predicts token i+1; visual positions never carry a label.
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")
        count += int((labels[1:] != IGNORE).sum())
    assert count > 0, "no supervised token in the batch"
    # Mean over every supervised token of the whole batch (== ForCausalLMLoss on a batch).
    loss = total / count
    loss.backward()

    out = {"loss": loss.detach().reshape(1).float()}
    if train_all:
        for name, p in model.named_parameters():
            out[name] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
    for name in SAM_NAMES:
        p = sam[name]
        out[name] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().contiguous()

    if all(int(t["image_mask"][b].sum()) == 1 for b in range(bsz)) and exchange_is_zero(sam):
        check_against_hf_batch(model, t, out, train_all)

    save_file(out, args.out)
    log(f"wrote {args.out}: loss {loss.item():.6f} over {count} tokens, {len(out) - 1} gradients")


def check_against_hf_batch(model, t: dict[str, torch.Tensor], out: dict[str, torch.Tensor], grads: bool) -> None:
    """One image per sample and zero exchange: HF can run the whole batch at once.

    That checks the way per-sample losses are combined (sum of token losses / total
    count) and, with --trainable all, every HF gradient.
    """
    bsz = t["input_ids"].shape[0]
    nq = model.config.num_query_tokens
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        hf = model(
            pixel_values=t["pixel_values"][:, 0],
            qformer_input_ids=t["qformer_input_ids"],
            qformer_attention_mask=t["qformer_attention_mask"],
            input_ids=torch.cat([image_placeholders(model, 1).expand(bsz, -1), t["input_ids"]], dim=1),
            attention_mask=torch.cat([torch.ones(bsz, nq, dtype=torch.int64), t["attention_mask"]], dim=1),
            labels=torch.cat([torch.full((bsz, nq), IGNORE, dtype=torch.int64), t["labels"]], dim=1),
        ).loss
    d = check_close("loss == HF batched InstructBLIP loss", out["loss"][0], hf.detach(), TOL_LOSS)
    log(f"  loss vs HF batched loss: |diff| {d:.2e}")
    if not grads:
        return
    hf.backward()
    worst = 0.0
    for name, p in model.named_parameters():
        ref = out[name]
        hf_grad = p.grad if p.grad is not None else torch.zeros_like(p)
        # Relative to the tensor's largest gradient: some entries (the vision k-bias,
        # softmax-invariant) are pure rounding noise.
        scale = max(float(ref.abs().max()), 1e-3)
        worst = max(worst, check_close(f"grad {name} == HF batched backward", hf_grad / scale, ref / scale, TOL_GRAD))
    log(f"  gradients of HF parameters vs HF batched backward: max scaled |diff| {worst:.2e}")


# ---------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def cmd_generate(args: argparse.Namespace) -> None:
    seed_everything(0)
    model, sam = load_model(args.model)
    t = load_inputs(args.inputs)
    bsz = t["input_ids"].shape[0]
    zero = exchange_is_zero(sam)
    eos = model.config.text_config.eos_token_id
    gen_kwargs = dict(
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        do_sample=False,
        length_penalty=1.0,
        early_stopping=False,
        min_length=0,
        bos_token_id=model.config.text_config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=model.config.text_config.pad_token_id,
    )
    sequences = torch.full((bsz, args.max_new_tokens), -1, dtype=torch.int64)
    lengths = torch.zeros(bsz, dtype=torch.int64)
    for b in range(bsz):
        s = get_sample(t, b)
        # Generation continues right after the last real text token, so the sample's
        # right padding is cut off first.
        s.input_ids = s.input_ids[:, : s.text_len]
        s.attention_mask = s.attention_mask[:, : s.text_len]
        prompt_ids = torch.cat([image_placeholders(model, s.n_images), s.input_ids], dim=1)
        prompt_mask = torch.ones_like(prompt_ids)
        if s.n_images == 1 and zero and args.penalty_scope == "prompt":
            out = model.generate(
                pixel_values=s.pixel_values,
                qformer_input_ids=s.qformer_input_ids,
                qformer_attention_mask=s.qformer_attention_mask,
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                **gen_kwargs,
            )
        else:
            visual = hf_visual_tokens(model, s) if zero else sam_visual_tokens(model, sam, s)
            embeds = torch.cat([visual, text_embeds(model, s)], dim=1)
            if args.penalty_scope == "prompt":
                # Same call InstructBlipForConditionalGeneration.generate makes internally.
                out = model.language_model.generate(
                    inputs_embeds=embeds, attention_mask=prompt_mask, input_ids=prompt_ids, **gen_kwargs
                )
            else:
                # SAM's original LAVIS code passes only inputs_embeds: no prompt ids, so
                # the repetition penalty sees generated tokens only (HF warns about exactly that).
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
                    out = model.language_model.generate(inputs_embeds=embeds, attention_mask=prompt_mask, **gen_kwargs)
                out = torch.cat([prompt_ids, out], dim=1)
        # With input_ids given, HF returns prompt + new tokens; keep the new ones only.
        assert torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids), "generate() output does not start with the prompt"
        new = out[0, prompt_ids.shape[1] :]
        hits = (new == eos).nonzero()
        n_new = int(hits[0, 0]) + 1 if hits.numel() else new.shape[0]  # keep the eos itself
        assert n_new <= args.max_new_tokens
        sequences[b, :n_new] = new[:n_new]
        lengths[b] = n_new
        log(f"  sample {b}: {s.n_images} image(s), prompt {prompt_ids.shape[1]} -> {new[:n_new].tolist()}"
            f"{' (eos)' if hits.numel() else ''}")
    save_file({"sequences": sequences, "lengths": lengths}, args.out)
    log(f"wrote {args.out}: sequences {list(sequences.shape)}, lengths {lengths.tolist()}")


# ---------------------------------------------------------------------------------------
# make-inputs
# ---------------------------------------------------------------------------------------
def cmd_make_inputs(args: argparse.Namespace) -> None:
    g = seed_everything(args.seed)
    cfg = InstructBlipConfig.from_pretrained(args.model)
    counts = [int(x) for x in args.images.split(",")]
    if len(counts) == 1:
        counts = counts * args.batch
    assert len(counts) == args.batch, f"--images has {len(counts)} counts for --batch {args.batch}"
    assert min(counts) >= 1, "every sample needs at least one real image"
    bsz, n_slots = args.batch, max(counts)
    size = cfg.vision_config.image_size
    t_len, tq_len = args.text_len, args.qformer_len
    text_vocab, q_vocab = cfg.text_config.vocab_size, cfg.qformer_config.vocab_size

    # Padding slots get random pixels too: the model must ignore them, not rely on zeros.
    pixel_values = torch.randn(bsz, n_slots, 3, size, size, generator=g)
    image_mask = torch.tensor([[1] * c + [0] * (n_slots - c) for c in counts], dtype=torch.int64)
    # Ids in [3, vocab-2]: never pad (0), bos (1), eos (2) or the image placeholder (vocab-1).
    input_ids = torch.randint(3, text_vocab - 1, (bsz, t_len), generator=g)
    q_ids = torch.randint(3, q_vocab - 1, (bsz, tq_len), generator=g)

    def lengths(full: int) -> list[int]:
        if not args.pad_text or bsz == 1:
            return [full] * bsz
        lo = max(2, (full + 1) // 2)
        rest = torch.randint(lo, max(lo, full - 1) + 1, (bsz - 1,), generator=g).tolist()
        return [full] + rest  # the first sample always has full length

    attention_mask = torch.zeros(bsz, t_len, dtype=torch.int64)
    q_mask = torch.zeros(bsz, tq_len, dtype=torch.int64)
    labels = input_ids.clone()
    for b, (lt, lq) in enumerate(zip(lengths(t_len), lengths(tq_len))):
        attention_mask[b, :lt] = 1
        q_mask[b, :lq] = 1
        input_ids[b, lt:] = PAD_ID
        q_ids[b, lq:] = PAD_ID
        labels[b, : lt // 2] = IGNORE  # the "instruction" half is not supervised
        labels[b, lt:] = IGNORE
    assert bool((labels[:, 0] == IGNORE).all())
    save_file(
        {
            "pixel_values": pixel_values,
            "image_mask": image_mask,
            "qformer_input_ids": q_ids,
            "qformer_attention_mask": q_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        },
        args.out,
    )
    log(f"wrote {args.out}: batch {bsz}, images {counts} in {n_slots} slots, "
        f"text lengths {attention_mask.sum(1).tolist()}, qformer lengths {q_mask.sum(1).tolist()}")


# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("make-checkpoint", help="tiny random InstructBLIP + sam.safetensors")
    c.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--guidance", choices=["zero", "random"], default="zero",
                   help="zero: exchange Linears zero (SAM at init); random: all SAM tensors random")
    c.add_argument("--image-token-id-zero-row", action="store_true",
                   help="set lm_head.weight[image_token_index] = 0")
    c.set_defaults(func=cmd_make_checkpoint)

    c = sub.add_parser("make-inputs", help="random input batch")
    c.add_argument("--model", required=True)
    c.add_argument("--batch", type=int, required=True)
    c.add_argument("--images", required=True, help="real images per sample, e.g. 3,2 (one value = all)")
    c.add_argument("--text-len", type=int, required=True)
    c.add_argument("--qformer-len", type=int, required=True)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--pad-text", action="store_true", help="right-pad every sample but the first")
    c.set_defaults(func=cmd_make_inputs)

    c = sub.add_parser("forward", help="reference logits in the Rust layout")
    c.add_argument("--model", required=True)
    c.add_argument("--inputs", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    c.set_defaults(func=cmd_forward)

    c = sub.add_parser("loss-grad", help="loss and gradients")
    c.add_argument("--model", required=True)
    c.add_argument("--inputs", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--trainable", choices=["sam", "all"], default="sam")
    c.set_defaults(func=cmd_loss_grad)

    c = sub.add_parser("generate", help="greedy / beam generation through HF generate()")
    c.add_argument("--model", required=True)
    c.add_argument("--inputs", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--num-beams", type=int, default=1)
    c.add_argument("--max-new-tokens", type=int, required=True)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--penalty-scope", choices=["prompt", "generated"], default="prompt",
                   help="prompt: HF InstructBLIP (prompt ids incl. placeholders are penalised); "
                        "generated: SAM/LAVIS (only generated tokens are penalised)")
    c.set_defaults(func=cmd_generate)


    args = p.parse_args(argv)
    start = time.perf_counter()
    args.func(args)
    log(f"{args.cmd}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
