"""Reference for `samtrain eval`: SAM's evaluation flow (its `evaluate_score.py`)
on the real PyPI `rouge` (1.0.1) and `pycocoevalcap` (1.2) packages.

    python eval_reference.py --pred pred.json --out DIR      # writes DIR/eval.json, DIR/eval_score.json
    python eval_reference.py --normalize < answers.json      # prints the normalised answers (a JSON list)

The answer normalisation is written out here from SAM's steps (see
data/src/eval/normalize.rs for what each does and why): it keeps SAM's quirks,
a period-stripping look-ahead that ignores what precedes the period and a
limit of 32 deleted periods. The normalised strings go to the scorers as they
are: SAM does not run the PTB tokenizer, and pycocoevalcap's Cider and Bleu
split on whitespace. Aggregates are rounded the way SAM's script rounds them:
ROUGE-L and CIDEr are numpy float64 (numpy's round), BLEU-4 a Python float.
"""

import argparse
import json
import os
import re
import sys

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from rouge import Rouge

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
PERIOD_STRIP_LIMIT = 32  # re.UNICODE, passed by SAM as Pattern.sub's count


def normalize(answer):
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    delete_all = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=PERIOD_STRIP_LIMIT)
    return out.strip("'").strip('"').strip().lower()


def evaluate(preds):
    rouge = Rouge()
    per_sample = []
    rouge_f = []
    hyps, refs = {}, {}
    for record in preds:
        sample_id = record["sample_id"]
        gt = normalize(record["gt_response"])
        pred = normalize(record["pred_response"])
        assert gt != "", f"sample {sample_id}: empty reference"
        if pred == "":
            f = 0
        else:
            f = rouge.get_scores(pred, gt)[0]["rouge-l"]["f"]
        rouge_f.append(f)
        per_sample.append({"id": sample_id, "rouge": f})
        hyps[sample_id] = [pred]
        refs[sample_id] = [gt]
    assert len(hyps) == len(preds), "sample ids repeat"
    cider, cider_per_sample = Cider().compute_score(refs, hyps)
    # Bleu prints its totals with verbose=1; keep stdout for our own output.
    bleu, bleu_per_sample = Bleu(4).compute_score(refs, hyps, verbose=0)
    for i, scores in enumerate(per_sample):
        scores["cider"] = cider_per_sample[i]
        scores["bleu4"] = bleu_per_sample[-1][i]
    summary = {
        "rouge": round(np.mean(rouge_f) * 100, 2),
        "cider": round(cider * 100, 2),
        "bleu4": round(bleu[-1] * 100, 2),
    }
    return summary, per_sample


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pred")
    parser.add_argument("--out")
    parser.add_argument("--normalize", action="store_true")
    args = parser.parse_args()
    if args.normalize:
        json.dump([normalize(a) for a in json.load(sys.stdin)], sys.stdout)
        return
    with open(args.pred, encoding="utf-8") as f:
        preds = json.load(f)
    summary, per_sample = evaluate(preds)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(args.out, "eval_score.json"), "w") as f:
        json.dump(per_sample, f, indent=4)


if __name__ == "__main__":
    main()
