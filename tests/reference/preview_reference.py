#!/usr/bin/env python3
"""Python reference for `samtrain data preview`: what SAM's code feeds its model.

Written from SAM's public code (McCartney01/SAM): `sam/models/sam/sam.py`
(`forward` for training, `generate` for prediction) and
`sam/processors/blip_processors.py` (`blip2_image_train`, `blip_image_eval`),
on the same `tokenizer.json` and images, with the `tokenizers` library in
place of transformers' tokenizer classes and torchvision's transforms on PIL
images.

- LLM tokenizer (SAM: LlamaTokenizer, truncation_side="left", then
  `add_special_tokens` of pad `[PAD]` and bos/eos/unk `</s>`): the prompt is
  BOS + the instruction, cut on the left to `max_txt_len` tokens in training
  and not cut at all in `generate`; the answer is tokenized as
  `answer + eos_token` with its BOS, cut on the right to
  `max_output_txt_len`, and that BOS dropped. Labels are -100 on the prompt.
- Q-Former tokenizer (SAM: BERT's, truncation_side="left"): the instruction
  with the tokenizer's own special tokens, cut on the left to `max_txt_len`.
- Images: evaluation stretches to size x size (bicubic), ToTensor,
  Normalize(CLIP mean, std). Training with augmentation draws
  RandomResizedCrop(scale=(0.5, 1.0)) + RandomHorizontalFlip.

Subcommands:

  samples  one JSON object per sample, as `samtrain data preview --json`
           (images: shape, mean and population std)
  crops    N draws of torchvision's RandomResizedCrop.get_params and the
           flip coin for a W x H image, as JSON lines [left, top, w, h, flip]
  apply    the training transform with a given crop and flip, on one image:
           its shape, mean and std
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer
from torchvision import transforms
from torchvision.transforms import functional as F
from torchvision.transforms.functional import InterpolationMode

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE = -100


def normalize(t: torch.Tensor) -> torch.Tensor:
    return transforms.Normalize(MEAN, STD)(t)


def eval_image(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    resized = transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC)(image)
    return normalize(transforms.ToTensor()(resized))


def train_image(path: Path, size: int, crop, flip: bool) -> torch.Tensor:
    left, top, width, height = crop
    image = Image.open(path).convert("RGB")
    out = F.resized_crop(image, top, left, height, width, [size, size], InterpolationMode.BICUBIC)
    if flip:
        out = F.hflip(out)
    return normalize(transforms.ToTensor()(out))


def stats(t: torch.Tensor) -> dict:
    return {
        "shape": list(t.shape),
        "mean": t.double().mean().item(),
        "std": t.double().std(unbiased=False).item(),
    }


class SamTokenizers:
    """SAM's two tokenizers over one tokenizer.json (the demo's setting)."""

    def __init__(self, path: Path, max_txt_len: int, max_output_txt_len: int):
        self.llm = Tokenizer.from_file(str(path))
        self.llm.no_truncation()
        self.llm.no_padding()
        # SAM: add_special_tokens({'pad_token': '[PAD]'}), then bos, eos and
        # unk all `</s>`.
        self.llm.add_special_tokens(["[PAD]"])
        self.bos = self.llm.token_to_id("</s>")
        self.eos_token = "</s>"
        self.qformer = Tokenizer.from_file(str(path))
        self.qformer.no_padding()
        self.qformer.add_special_tokens(["[PAD]"])
        self.qformer.enable_truncation(max_txt_len, direction="left")
        self.max_txt_len = max_txt_len
        self.max_output_txt_len = max_output_txt_len

    def prompt(self, instruction: str, truncate: bool) -> list[int]:
        ids = self.llm.encode(instruction, add_special_tokens=False).ids
        if truncate:
            # truncation_side="left", max_length counts the BOS.
            ids = ids[max(0, len(ids) - (self.max_txt_len - 1)):]
        return [self.bos] + ids

    def answer(self, output: str) -> list[int]:
        ids = [self.bos] + self.llm.encode(output + self.eos_token, add_special_tokens=False).ids
        # truncation_side="right", then concat_text_input_output drops the BOS.
        return ids[: self.max_output_txt_len][1:]

    def qformer_ids(self, instruction: str) -> list[int]:
        return self.qformer.encode(instruction, add_special_tokens=True).ids

    def decode(self, ids: list[int], qformer: bool = False) -> str:
        tok = self.qformer if qformer else self.llm
        return tok.decode(ids, skip_special_tokens=False)


def samples(args) -> None:
    data = Path(args.data)
    records = json.loads((data / "annotations.json").read_text())
    tok = SamTokenizers(Path(args.tokenizer), args.max_txt_len, args.max_output_txt_len)
    training = args.split == "train"
    for index, record in enumerate(records[: args.samples]):
        instruction, output = record["instruction"], record["output"]
        if training:
            prompt = tok.prompt(instruction, truncate=True)
            answer = tok.answer(output)
            llm = prompt + answer
            labels = [IGNORE] * len(prompt) + answer
        else:
            llm = tok.prompt(instruction, truncate=False)
            labels = [IGNORE] * len(llm)
        qformer = tok.qformer_ids(instruction)
        images = [stats(eval_image(data / p, args.image_size)) for p in record["img_list"]]
        print(
            json.dumps(
                {
                    "index": index,
                    "llm_input_ids": llm,
                    "labels": labels,
                    "qformer_input_ids": qformer,
                    "qformer_attention_mask": [1] * len(qformer),
                    "images": images,
                    "decoded": {
                        "llm_input_ids": tok.decode(llm),
                        "labels": tok.decode([l for l in labels if l != IGNORE]),
                        "qformer_input_ids": tok.decode(qformer, qformer=True),
                    },
                }
            )
        )


def crops(args) -> None:
    torch.manual_seed(args.seed)
    image = Image.new("RGB", (args.width, args.height))
    for _ in range(args.draws):
        top, left, h, w = transforms.RandomResizedCrop.get_params(
            image, scale=(0.5, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)
        )
        flip = bool(torch.rand(1).item() < 0.5)
        print(json.dumps([left, top, w, h, flip]))


def apply(args) -> None:
    crop = [int(v) for v in args.crop.split(",")]
    t = train_image(Path(args.image), args.image_size, crop, args.flip)
    print(json.dumps(stats(t)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("samples")
    s.add_argument("--data", required=True, help="MmLINK folder with annotations.json")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--split", choices=["train", "eval"], default="train")
    s.add_argument("--samples", type=int, default=4)
    s.add_argument("--image-size", type=int, required=True)
    s.add_argument("--max-txt-len", type=int, default=128)
    s.add_argument("--max-output-txt-len", type=int, default=256)
    s.set_defaults(run=samples)
    c = sub.add_parser("crops")
    c.add_argument("--width", type=int, required=True)
    c.add_argument("--height", type=int, required=True)
    c.add_argument("--draws", type=int, default=1000)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=crops)
    a = sub.add_parser("apply")
    a.add_argument("--image", required=True)
    a.add_argument("--image-size", type=int, required=True)
    a.add_argument("--crop", required=True, help="left,top,width,height")
    a.add_argument("--flip", action="store_true")
    a.set_defaults(run=apply)
    args = parser.parse_args()
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
