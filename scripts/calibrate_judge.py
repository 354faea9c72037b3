"""Store a judge's confusion on labelled held-out images with the judge, for corrected fractions.

    python scripts/calibrate_judge.py                      # the config's judge on its reference set
    python scripts/calibrate_judge.py --judge my.onnx --folder data/labelled --attribute gender

The labelled images (the config's ``reference:`` set, e.g. the 457 held-out real digits, or a
folder with one subfolder per class) are cut into two seeded halves, stratified by class. The
confusion counts of half A (or of all images, ``--fit_on all``) go into the judge's file: a
``.pt`` checkpoint's dict and the ``.json`` beside it (weights untouched), or an ``.onnx``
judge's sidecar. Printed and recorded: on resampled class mixes of the other half, how far the
raw and the corrected fractions land from the truth (M from A checked on B, and B on A).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from models.files import resolve_path
from models.judge import confusion_record, load_judge, store_confusion
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.evaluation.calibration import (check_correction, confusion_counts, default_mixes,
                                          judge_labels, read_labelled_folder, stratified_halves)
from utils.evaluation.evaluate import real_reference, real_reference_labels
from utils.evaluation.metrics import joint_labels


def labelled_set(args, cfg: dict, judge):
    """(images, {attribute: true labels}, description) from --folder or the config's reference."""
    if args.folder:
        attr = args.attribute or (next(iter(judge.attributes)) if len(judge.attributes) == 1 else None)
        if attr not in judge.attributes:
            raise ValueError(f"--attribute must name one of the judge's attributes {sorted(judge.attributes)}, got {attr!r}")
        x, y = read_labelled_folder(args.folder, judge.attributes[attr])
        return x, {attr: y}, f"labelled folder {args.folder}"
    x, labels = real_reference(cfg), real_reference_labels(cfg)
    if x is None:
        raise ValueError(f"config {cfg['name']} has no reference set; pass --folder")
    labels = {a: np.asarray(v) for a, v in labels.items() if a in judge.attributes}
    return x, labels, f"reference set {cfg['reference']!r} of {args.config}"


def counts_on(true: dict, pred: dict, idx: np.ndarray, sizes: dict) -> dict[str, np.ndarray]:
    """Confusion counts per attribute on the images at ``idx``; every true class must be there."""
    out = {a: confusion_counts(true[a][idx], pred[a][idx], sizes[a]) for a in true}
    for a, c in out.items():
        if (c.sum(axis=1) == 0).any():
            raise ValueError(f"attribute {a!r}: classes {np.flatnonzero(c.sum(1) == 0).tolist()} have no "
                             f"labelled image in the half used for M; label more images")
    return out


def _part(true: dict, pred: dict, idx: np.ndarray) -> tuple[dict, dict]:
    return {a: v[idx] for a, v in true.items()}, {a: v[idx] for a, v in pred.items()}


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    p.add_argument("--judge", help="judge file (.pt, or .onnx with its .json sidecar; default: the config's judge)")
    p.add_argument("--folder", help="labelled images, one subfolder per class (default: the config's reference set)")
    p.add_argument("--attribute", help="with --folder: the judge's attribute the subfolders name")
    p.add_argument("--seed", type=int, default=0, help="seed of the two halves and of the mixes")
    p.add_argument("--fit_on", choices=["half", "all"], default="half",
                   help="estimate the stored M on half A (checkable on half B) or on all images")
    p.add_argument("--n", type=int, default=2000, help="images resampled per checked class mix")
    p.add_argument("--dry_run", action="store_true", help="print the figures, store nothing")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    path = resolve_path(args.judge or cfg["judge"])
    judge = load_judge(str(path))
    x, true, source = labelled_set(args, cfg, judge)
    sizes = {a: len(judge.attributes[a]) for a in true}
    pred = judge_labels(judge, x, true)
    half_a, half_b = stratified_halves(joint_labels(true, sizes), args.seed)
    counts_a, counts_b = counts_on(true, pred, half_a, sizes), counts_on(true, pred, half_b, sizes)
    mixes = default_mixes(true, sizes)
    on_b, on_a = {}, {}
    for fam in true:        # mixes on each attribute in turn; errors on every attribute
        fm = [m for m in mixes if m[1] == fam]
        on_b[fam] = check_correction(*_part(true, pred, half_b), counts_a, fm, args.n, args.seed)
        on_a[fam] = check_correction(*_part(true, pred, half_a), counts_b, fm, args.n, args.seed)
    print(f"{source}: {len(x)} images, halves A {len(half_a)} / B {len(half_b)} (seed {args.seed}); "
          f"max |fraction error| over resampled mixes of {args.n} images (uniform, each class at 0.8)")
    print(f"accuracy: {json.dumps({a: round(float((pred[a] == true[a]).mean()), 4) for a in true})}")
    print("| mixes on | attribute | raw error on B | corrected on B (M from A) | raw error on A | corrected on A (M from B) |")
    print("|---|---|---|---|---|---|")
    for fam in true:
        for a in true:
            b_, a_ = on_b[fam][a], on_a[fam][a]
            print(f"| {fam} | {a} | {b_['raw']:.4f} | {b_['corrected']:.4f} | {a_['raw']:.4f} | {a_['corrected']:.4f} |")
    fit = half_a if args.fit_on == "half" else np.arange(len(x))
    record = confusion_record(counts_a if args.fit_on == "half" else counts_on(true, pred, fit, sizes),
                              judge.attributes, data=source, fit_on=args.fit_on, split_seed=args.seed,
                              n_images=int(len(fit)), fit_indices=fit.tolist(),
                              check={"fit_on_a_check_on_b": on_b, "fit_on_b_check_on_a": on_a,
                                     "n_per_mix": args.n},
                              command="python scripts/calibrate_judge.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.dry_run:
        print(json.dumps({a: v["matrix"] for a, v in record["attributes"].items()}))
        return 0
    store_confusion(path, record)
    print(f"stored the confusion ({args.fit_on}: {len(fit)} images) in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
