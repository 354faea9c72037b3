"""Evaluate images with the judge: a folder of images, or N fresh vanilla samples of the default.

    python scripts/evaluate.py --vanilla 1000            # the embedded default's baseline report
    python scripts/evaluate.py --folder runs/fair --target parity=0.5

Reports the judge's accuracy on held-out real digits, attribute fractions (with FD and bootstrap
CI against --target; raw and corrected for the judge's confusion), the share recognised with
confidence >= 0.9, and the Frechet distance in the judge's feature space to held-out real digits
next to that between two disjoint real halves.
With --vanilla it also writes a grid of samples next to real digits (--grid).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.guidance.targets import parse_fraction_vector  # noqa: E402
from utils.app.config import load_config  # noqa: E402
from models.digits import ATTRIBUTES, attribute_labels, load_split  # noqa: E402
from utils.evaluation.evaluate import evaluate_images, fd_cell, fractions_cell, judge_from_config  # noqa: E402
from utils.sampling.images import grid_array, to_uint8  # noqa: E402
from PIL import Image  # noqa: E402
from utils.evaluation.metrics import frechet_distance  # noqa: E402
from utils.app.runtime import pick_device, setup_logging  # noqa: E402
from utils.app.cli import guarded  # noqa: E402


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="a folder of <seed>.png images")
    src.add_argument("--vanilla", type=int, metavar="N", help="sample N vanilla images (seeds 0..N-1)")
    p.add_argument("--target", default="parity=0.5", help="targets for FD, e.g. parity=0.5,digit=uniform")
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--grid", default="docs/vanilla_vs_real.png")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config)
    judge = judge_from_config(cfg)
    split = load_split(cfg["model"]["image_size"])
    if args.folder:
        from utils.sampling.images import read_images
        _, x = read_images(Path(args.folder))
    else:
        from utils.sampling.pipeline import load_pipeline, plan_batches, sample_batches
        pipe = load_pipeline(cfg, pick_device(args.device))
        imgs = [im for _, im, _ in sample_batches(pipe, plan_batches(list(range(args.vanilla)), args.bs), desc="vanilla")]
        x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        real, fake = grid_array(to_uint8(split.heldout_x[:100]), 10), grid_array(to_uint8(x[:100]), 10)
        gap = np.full((real.shape[0], 6, real.shape[2]), 255, np.uint8)
        side = Image.fromarray(np.concatenate([real, gap, fake], axis=1)[..., 0])
        side.resize((side.width * 3, side.height * 3), Image.NEAREST).save(args.grid)
    targets = {}
    for part in args.target.split(","):
        a, v = part.split("=")
        targets[a] = parse_fraction_vector(a, v, ATTRIBUTES[a]).tolist()
    report = evaluate_images(x, judge, targets, split.heldout_x)
    probs, labels = judge.predict(split.heldout_x), attribute_labels(split.heldout_y)
    report["judge_heldout_accuracy"] = {a: float((probs[a].argmax(1).numpy() == labels[a]).mean())
                                        for a in ATTRIBUTES}
    half = len(split.heldout_x) // 2
    f = judge.features(split.heldout_x).double().numpy()
    report["frechet_real_halves"] = frechet_distance(f[:half], f[half:])
    report["train_fractions"] = split.metadata()["train_fractions"]
    print(f"judge accuracy on held-out real digits: {report['judge_heldout_accuracy']}")
    print(f"images: {len(x)}; confident (>= 0.9) share: {report['confident_share']:.3f}")
    print(f"Frechet (judge features) to held-out real: {report['frechet']:.2f}; "
          f"between two real halves ({half} each): {report['frechet_real_halves']:.2f}")
    for a, m in report["attributes"].items():
        fd = f", FD {fd_cell(m)}, corrected FD {fd_cell(m, 'fd_corrected')}" if "fd" in m else ""
        print(f"{a}: fractions {fractions_cell(m)}{fd}; "
              f"training data {np.round(list(report['train_fractions'][a].values()), 3).tolist()}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
