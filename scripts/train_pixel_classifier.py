"""Train the noise-aware pixel classifier for the classifier-guidance baselines.

    python scripts/train_pixel_classifier.py      # writes pretrained/digits16_pixel_clf.pt (+ .json)

Trained on the DDPM's own training subset (the labelled data a model owner has; biased 80/20
parity like the model), noised with the model's schedule at uniformly random t; accuracy is
measured on the held-out real digits noised at several t.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from tqdm import tqdm

from models.digits_judge import augment
from models.loader import resolve_path
from models.pixel_classifier import (NoisyPixelClassifier, PixelClassifierConfig,
                                     noisy_accuracy, train_pixel_classifier)
from utils.app.config import load_config
from utils.sampling.diffusion import Schedule
from models.digits import attribute_labels, load_split
from utils.app.cli import guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml", help="model config (its diffusion schedule)")
    p.add_argument("--out", default="pretrained/digits16_pixel_clf.pt")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy 2-core CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    schedule = Schedule.from_config(cfg["diffusion"])
    split = load_split(cfg["model"]["image_size"])
    lab = {a: torch.as_tensor(v) for a, v in attribute_labels(split.train_y).items()}
    held = {a: torch.as_tensor(v) for a, v in attribute_labels(split.heldout_y).items()}
    net = NoisyPixelClassifier(PixelClassifierConfig(image_size=cfg["model"]["image_size"],
                                                     in_channels=cfg["model"]["in_channels"],
                                                     width=args.width))
    t0 = time.time()
    losses = train_pixel_classifier(net, split.train_x, lab, schedule, args.steps, args.batch_size,
                                    args.lr, args.seed, None if args.no_augment else augment,
                                    lambda it: tqdm(it, desc="train pixel classifier"))
    wall = round(time.time() - t0, 1)
    acc = noisy_accuracy(net, split.heldout_x, held, schedule)
    command = "python scripts/train_pixel_classifier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"train": "DDPM training subset (models.digits.load_split().train_x)",
            **split.metadata(), "augment": not args.no_augment}
    metrics = {"heldout_accuracy_by_t": acc, "loss_every_100": losses, "wall_time_s": wall,
               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "parameters": sum(q.numel() for q in net.parameters())}
    out = resolve_path(args.out)
    net.save(out, cfg["diffusion"], data, metrics, command)
    record = {"command": command, "config": args.config, "diffusion": cfg["diffusion"],
              "data_source": data, "metrics": metrics}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print("held-out accuracy by t:", json.dumps(acc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
