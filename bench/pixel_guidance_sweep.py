"""Baselines on the embedded default: pixel-space classifier guidance (scale sweep) and
rejection sampling with the judge, against vanilla on the same seeds.

    python bench/pixel_guidance_sweep.py --n 200 --scales 1,3,10,30,100 --variants xt,x0
    python bench/pixel_guidance_sweep.py --n 200 --variants none --rejection

Distribution guidance of one attribute to --fractions (chi2, scaled by the batch size);
prints a Markdown row per run (judge fractions, FD with bootstrap CI, Frechet to held-out real
digits in judge features, confident share, s/img and its ratio to vanilla) and writes the
table and the raw reports to --out as <name>.md and <name>.json (benchmark kind ``pixel_sweep``,
bench/lists/guidance.yml).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.sampling.pipeline import load_pipeline
from utils.app.config import load_config
from utils.evaluation.evaluate import (evaluate_images, fd_cell, fractions_cell, judge_from_config,
                                       real_reference)
from utils.sampling.pipeline import plan_batches, sample_batches
from utils.baselines.pixel_guidance import load_pixel_classifier, pixel_guidance_factory
from utils.baselines.rejection import rejection_sample, uint8_to_tensor
from utils.app.runtime import pick_device, setup_logging
from utils.app.cli import guarded


def timed_run(pipe, seeds, bs, make_guide, desc):
    """(images float [N,C,H,W] in [-1,1], wall seconds) for one sampling run."""
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    imgs = [im for _, im, _ in sample_batches(pipe, plan_batches(seeds, bs), make_guide, desc=desc)]
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return uint8_to_tensor(np.concatenate(imgs)), time.time() - t0


def row(r: dict, attr: str, van_s: float) -> str:
    m = r["attributes"][attr]
    s_img = r["wall_s"] / r["n_drawn"] if "n_drawn" in r else r["wall_s"] / r["n"]
    return (f"| {r['name']} | {fractions_cell(m)} | {fd_cell(m)} | {fd_cell(m, 'fd_corrected')} | "
            f"{r['confident_share']:.3f} | "
            f"{r.get('frechet', float('nan')):.2f} | {r['wall_s'] / r['n']:.4f} | "
            f"{r['wall_s'] / van_s:.2f} |" + (f" drawn {r['n_drawn']} ({s_img:.4f} s per drawn)"
                                               if "n_drawn" in r else ""))


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    p.add_argument("--clf", help="pixel classifier (default: pretrained/digits16_pixel_clf.pt)")
    p.add_argument("--attr", default="parity")
    p.add_argument("--fractions", default="0.5,0.5", help="target class fractions of --attr")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--variants", default="xt,x0", help="xt, x0, or none")
    p.add_argument("--scales", default="1,3,10,30,100")
    p.add_argument("--rejection", action="store_true", help="also run rejection sampling with the judge")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/pixel_guidance_sweep")
    p.add_argument("--name", default="sweep", help="file stem of the table and the JSON in --out")
    args = p.parse_args(argv)
    setup_logging()
    cfg, device = load_config(args.config), pick_device(args.device)
    pipe = load_pipeline(cfg, device)
    judge, real = judge_from_config(cfg), real_reference(cfg)
    target = [float(v) for v in args.fractions.split(",")]
    targets, seeds = {args.attr: target}, list(range(args.n))
    variants = [] if args.variants == "none" else args.variants.split(",")
    clf = load_pixel_classifier(cfg, device, args.clf) if variants else None

    def report(name, x, wall, **extra):
        r = evaluate_images(x, judge, targets, real)
        r.update(name=name, wall_s=round(wall, 2), **extra)
        return r

    reports = [report("vanilla", *timed_run(pipe, seeds, args.bs, None, "vanilla"), variant="vanilla", scale=0)]
    van_s = reports[0]["wall_s"]
    head = ("| run | judge fractions (corr. = corrected for its confusion) | FD [95% CI] | corrected FD [95% CI] "
            "| confident | Frechet | s/img | time / vanilla |\n|---|---|---|---|---|---|---|---|")
    print(head + "\n" + row(reports[0], args.attr, van_s), flush=True)
    for variant in variants:
        for sc in [float(v) for v in args.scales.split(",")]:
            make = pixel_guidance_factory(pipe, clf, "distribution", targets, sc, variant)
            name = f"pixel {variant} s={sc:g}"
            reports.append(report(name, *timed_run(pipe, seeds, args.bs, make, name), variant=variant, scale=sc))
            print(row(reports[-1], args.attr, van_s), flush=True)
    if args.rejection:
        res = rejection_sample(pipe, judge, args.attr, target, args.n, args.bs)
        reports.append(report("rejection (judge)", res.tensor(), res.wall_s, variant="rejection",
                              n_drawn=res.n_drawn, n_needed=res.n_needed, seeds=res.seeds))
        print(row(reports[-1], args.attr, van_s), flush=True)

    md = (f"{args.attr} -> {target}: n={args.n}, seeds 0-{args.n - 1}, batch {args.bs}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}\n\n"
          + head + "\n" + "\n".join(row(r, args.attr, van_s) for r in reports))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"command": "python bench/pixel_guidance_sweep.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "reports": reports}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
