"""The embedded default's data: scikit-learn's handwritten digits, with a deliberate bias.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 digits (grey levels 0..16) with the
package: no download. We upsample them bilinearly to 16x16 and scale to [-1, 1].

Attributes derived from the digit label:
  - ``parity``: 0 = even, 1 = odd
  - ``magnitude``: 0 = low (digit < 5), 1 = high (digit >= 5)
  - ``digit``: the label, 10 classes

Split (seeded, per digit class, so every part holds every digit):
  - ``pool`` (60%): the DDPM's side. The DDPM's training subset is drawn from it with the
    joint (parity, magnitude) fractions in ``BIAS`` (80% even, 70% low, not independent), each
    digit equally likely within its cell. Pool images left out of the subset go to the judge.
  - ``judge`` (15% + the pool's leftovers): trains the independent pixel-space judge.
  - ``heldout`` (25%): evaluation only (judge accuracy, the real side of the Frechet distance).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
ATTRIBUTES: dict[str, list[str]] = {
    "parity": ["even", "odd"],
    "magnitude": ["low", "high"],
    "digit": [str(d) for d in range(10)],
}
#: joint training fractions over (parity, magnitude)
BIAS = {("even", "low"): 0.6, ("even", "high"): 0.2, ("odd", "low"): 0.1, ("odd", "high"): 0.1}
SPLIT_SEED = 2024
POOL_FRACTION, JUDGE_FRACTION = 0.60, 0.15


def attribute_labels(digits: np.ndarray) -> dict[str, np.ndarray]:
    """Class index of every attribute for an array of digit labels."""
    digits = np.asarray(digits)
    return {"parity": digits % 2, "magnitude": (digits >= 5).astype(np.int64),
            "digit": digits.astype(np.int64)}


def to_model_images(images8: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """8x8 grey levels 0..16 -> float tensor [N, 1, size, size] in [-1, 1] (bilinear)."""
    x = torch.as_tensor(images8, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


@dataclass
class DigitsSplit:
    """Images [N,1,16,16] in [-1,1] and digit labels [N] for each part of the split."""
    train_x: torch.Tensor
    train_y: np.ndarray
    judge_x: torch.Tensor
    judge_y: np.ndarray
    heldout_x: torch.Tensor
    heldout_y: np.ndarray
    train_index: np.ndarray
    judge_index: np.ndarray
    heldout_index: np.ndarray

    def metadata(self) -> dict:
        """Exact class fractions of the DDPM's training subset, for the records."""
        labels = attribute_labels(self.train_y)
        fr = {a: {name: float(np.mean(labels[a] == k)) for k, name in enumerate(names)}
              for a, names in ATTRIBUTES.items()}
        joint = {f"{p}/{m}": float(np.mean((labels["parity"] == i) & (labels["magnitude"] == j)))
                 for i, p in enumerate(ATTRIBUTES["parity"])
                 for j, m in enumerate(ATTRIBUTES["magnitude"])}
        return {"source": "sklearn.datasets.load_digits", "image_size": IMAGE_SIZE,
                "split_seed": SPLIT_SEED, "n_train": int(len(self.train_y)),
                "n_judge": int(len(self.judge_y)), "n_heldout": int(len(self.heldout_y)),
                "train_fractions": fr, "train_joint_parity_magnitude": joint}


def _cell_of(digit: int) -> tuple[str, str]:
    return ATTRIBUTES["parity"][digit % 2], ATTRIBUTES["magnitude"][int(digit >= 5)]


def load_split(size: int = IMAGE_SIZE, seed: int = SPLIT_SEED) -> DigitsSplit:
    """The fixed, seeded split described in the module docstring."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images, labels = data.images, data.target
    rng = np.random.default_rng(seed)
    pool, judge, heldout = {}, [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        n_pool, n_judge = int(POOL_FRACTION * len(idx)), int(JUDGE_FRACTION * len(idx))
        pool[d] = idx[:n_pool]
        judge.extend(idx[n_pool:n_pool + n_judge])
        heldout.extend(idx[n_pool + n_judge:])
    # largest subset with the BIAS cell fractions, each digit equally likely inside its cell
    digits_in = {cell: [d for d in range(10) if _cell_of(d) == cell] for cell in BIAS}
    n_total = min(int(len(pool[d]) * len(digits_in[c]) / BIAS[c]) for c in BIAS for d in digits_in[c])
    train = []
    for cell, frac in BIAS.items():
        per_digit = round(frac * n_total / len(digits_in[cell]))
        for d in digits_in[cell]:
            train.extend(pool[d][:per_digit])
            judge.extend(pool[d][per_digit:])
    train, judge, heldout = (np.sort(np.asarray(v)) for v in (train, judge, heldout))
    return DigitsSplit(to_model_images(images[train], size), labels[train],
                       to_model_images(images[judge], size), labels[judge],
                       to_model_images(images[heldout], size), labels[heldout],
                       train, judge, heldout)
