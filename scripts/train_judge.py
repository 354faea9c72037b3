"""Train the embedded default's independent judge (pixel-space digit CNN) and report accuracy.

    python scripts/train_judge.py            # writes pretrained/digits16_judge.pt (+ .json)
    python scripts/train_judge.py --split train --prior uniform --seed 1 \
        --out pretrained/digits16_cnn_labeller.pt     # the transformer default's check labeller

The judge is trained on the ``judge`` part of the digits split (disjoint from the DDPM's training
subset); accuracy is measured on the ``heldout`` part, per attribute. A new judge has no confusion
matrices: run ``python scripts/calibrate_judge.py`` after it for judge-corrected fractions.

``--split train`` trains the same network on the DDPM's training subset instead (the data a model
owner has): a labeller, never a judge. ``--prior uniform`` divides that subset's digit prior out of
its output (``models.digits_judge.divide_prior``), so that an ambiguous image is not read as the
training data's majority digit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from models.digits_judge import DigitsJudge, divide_prior, train_digits_judge
from models.loader import resolve_path
from models.digits import ATTRIBUTES, attribute_labels, load_split
from utils.app.cli import guarded


def judge_accuracy(judge, x: torch.Tensor, digits: np.ndarray) -> dict[str, float]:
    """Accuracy of the judge's argmax per attribute on real images with known digits."""
    probs, labels = judge.predict(x), attribute_labels(digits)
    return {a: float((probs[a].argmax(1).numpy() == labels[a]).mean()) for a in ATTRIBUTES}


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pretrained/digits16_judge.pt")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["judge", "train"], default="judge",
                   help="train on the judge's part of the split (the judge) or on the DDPM's "
                        "training subset (a labeller)")
    p.add_argument("--prior", choices=["train", "uniform", "balanced"], default="train",
                   help="uniform: divide the training data's digit prior out of the output; "
                        "balanced: draw every digit equally often in training instead")
    args = p.parse_args(argv)
    out = resolve_path(args.out)
    if args.split == "train" and out == resolve_path(p.get_default("out")):
        p.error("--split train makes a labeller: give --out (e.g. pretrained/digits16_cnn_labeller.pt), "
                "the judge file is trained on --split judge only")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    split = load_split()
    x, y = (split.judge_x, split.judge_y) if args.split == "judge" else (split.train_x, split.train_y)
    t0 = time.time()
    net = train_digits_judge(x, y, steps=args.steps, seed=args.seed, balanced=args.prior == "balanced")
    counts = torch.bincount(torch.as_tensor(y), minlength=10)
    if args.prior == "uniform":
        divide_prior(net, counts)
    acc = judge_accuracy(DigitsJudge(net), split.heldout_x, split.heldout_y)
    meta = {"command": "python scripts/train_judge.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "steps": args.steps, "seed": args.seed, "split": args.split, "prior": args.prior,
            "train_digit_counts": counts.tolist(), "train_images": int(len(y)),
            "heldout_images": int(len(split.heldout_y)), "heldout_accuracy": acc,
            "wall_time_s": round(time.time() - t0, 1)}
    DigitsJudge(net, meta).save(out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print("judge accuracy on held-out real digits:", json.dumps(acc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
