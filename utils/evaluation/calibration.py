"""Calibrating a judge on labelled images: its confusion counts, seeded halves to fit on one and
check on the other, and the check itself (how far raw and corrected fractions land from the
truth on resampled class mixes). scripts/calibrate_judge.py drives it.

Shapes: images [N, C, H, W] in [-1, 1], labels [N] int, counts [K, K] (rows: true class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from utils.evaluation.correction import confusion_matrix, correct_fractions
from utils.evaluation.metrics import class_fractions, joint_labels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def judge_labels(judge, images: torch.Tensor, attrs) -> dict[str, np.ndarray]:
    """The judge's argmax class [N] per attribute in ``attrs``."""
    probs = judge.predict(images)
    return {a: np.asarray(probs[a]).argmax(1) for a in attrs}


def confusion_counts(true, pred, num_classes: int) -> np.ndarray:
    """counts [K, K]: counts[i, j] = images of true class i the judge called j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(true), np.asarray(pred)), 1)
    return counts


def stratified_halves(strata, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b) splitting [N] in two: each stratum's images shuffled (seeded) and cut, the
    first ceil(n/2) to a, so both halves hold every stratum with two or more images."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    a, b = [], []
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        a.extend(idx[:(len(idx) + 1) // 2])
        b.extend(idx[(len(idx) + 1) // 2:])
    return np.sort(np.asarray(a, dtype=np.int64)), np.sort(np.asarray(b, dtype=np.int64))


def mix_weights(labels: Mapping[str, np.ndarray], attr: str, shares) -> np.ndarray:
    """Per-image sampling weights [N] that give ``attr`` the class ``shares``: class c's share is
    spread evenly over the strata (joint label of every attribute) in it, then over their images."""
    sizes = {a: int(v.max()) + 1 for a, v in labels.items()}
    strata = joint_labels(labels, sizes)
    w = np.zeros(len(strata))
    for c, share in enumerate(shares):
        in_c = labels[attr] == c
        cells = np.unique(strata[in_c])
        for s in cells:
            sel = strata == s
            w[sel] = share / len(cells) / sel.sum()
    return w / w.sum()


def default_mixes(labels: Mapping[str, np.ndarray], num_classes: Mapping[str, int]) -> list[tuple[str, str, list]]:
    """(name, attribute, shares) to check on: per attribute, uniform, then each class at 80% and
    the rest even (binary: 80/20, 50/50, 20/80)."""
    out = []
    for a in labels:
        k = num_classes[a]
        out.append((f"{a} uniform", a, [1.0 / k] * k))
        for c in range(k):
            shares = [0.2 / (k - 1)] * k
            shares[c] = 0.8
            out.append((f"{a} class {c} at 0.8", a, shares))
    return out


def check_correction(true: Mapping[str, np.ndarray], pred: Mapping[str, np.ndarray],
                     counts: Mapping[str, np.ndarray], mixes, n: int = 2000, seed: int = 0) -> dict:
    """Resample n images per mix (with replacement, ``mix_weights``) and compare with the drawn
    images' true fractions: per attribute the largest |p_raw - p_true| and |p_corrected - p_true|
    over mixes and classes (0 is perfect), and the mix where the corrected error peaked."""
    rng = np.random.default_rng(seed)
    out = {a: {"raw": 0.0, "corrected": 0.0, "worst_mix": None} for a in counts}
    for name, attr, shares in mixes:
        idx = rng.choice(len(true[attr]), size=n, p=mix_weights(true, attr, shares))
        for a, c in counts.items():
            k = c.shape[0]
            p_true = class_fractions(true[a][idx], k)
            p_raw = class_fractions(pred[a][idx], k)
            p_cor = correct_fractions(p_raw, confusion_matrix(c))
            raw, cor = (round(float(np.abs(p - p_true).max()), 6) for p in (p_raw, p_cor))
            out[a]["raw"] = max(out[a]["raw"], raw)
            if cor >= out[a]["corrected"]:
                out[a].update(corrected=cor, worst_mix=name)
    return out


def read_labelled_folder(folder: str | Path, classes: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Images [N, C, H, W] in [-1, 1] and class indices [N] from ``folder/<class name>/*.png``
    (one subfolder per class, named as the judge's classes; all images the same size)."""
    from PIL import Image
    folder = Path(folder)
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if sorted(subs) != sorted(classes):
        raise ValueError(f"{folder} needs one subfolder per class {classes}, found {subs}")
    arrs, labels = [], []
    for k, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{folder / name} holds no images ({sorted(IMAGE_SUFFIXES)})")
        arrs += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        labels += [k] * len(files)
    if len({a.shape for a in arrs}) != 1:
        raise ValueError(f"{folder}: images differ in size {sorted({a.shape for a in arrs})[:4]}; resize them to one size")
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, np.asarray(labels, dtype=np.int64)
