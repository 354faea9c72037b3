"""Rejection sampling with the judge: the "oracle" baseline for a target attribute distribution.

Draw vanilla images with consecutive seeds, label each by the judge (argmax), and keep an image
only while its class's quota is not yet full; stop when every quota is full. The kept images
have exactly the target class counts *by the judge's own labels* (so their judge FD is ~0 by
construction): the cost, the number of images drawn, is what this baseline measures. For a
target p and the model's class fractions v, about n * max_c p_c / v_c images are drawn.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from utils.sampling.pipeline import plan_batches, sample_batches
from models.judge import Judge


@dataclass
class RejectionResult:
    """Accepted images, in seed order, and what they cost."""
    images: np.ndarray              # uint8 [n, H, W, C]
    seeds: list[int]                # the accepted images' seeds
    labels: list[int]               # the judge's class of each accepted image
    quotas: list[int]               # images wanted per class (sum n)
    n_drawn: int                    # images sampled (whole batches)
    n_needed: int                   # images examined until the last quota filled
    wall_s: float

    def tensor(self) -> torch.Tensor:
        """The accepted images as float [n, C, H, W] in [-1, 1] (what the judge reads)."""
        return uint8_to_tensor(self.images)


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,C] -> float [N,C,H,W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def class_quotas(target, n: int) -> list[int]:
    """round(n * p_c) per class, by largest remainder so that they sum to n exactly."""
    p = np.asarray(target, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
        raise ValueError(f"target must be class fractions >= 0 summing to 1, got {p.tolist()}")
    if n < 1:
        raise ValueError(f"number of images n must be >= 1, got {n}")
    raw = n * p
    q = np.floor(raw).astype(int)
    for c in np.argsort(-(raw - q), kind="stable")[: n - q.sum()]:
        q[c] += 1
    return q.tolist()


def accept_from_stream(stream, classify, quotas: list[int], max_draws: int) -> dict:
    """Fill class quotas from a stream of (seeds, images uint8 [b,H,W,C]) batches.

    :param classify: images uint8 [b,H,W,C] -> class index per image [b].
    Returns a dict of images, seeds, labels, n_drawn, n_needed; raises RuntimeError when the
    stream ends (max_draws images) with a quota still open.
    """
    have = [0] * len(quotas)
    imgs, seeds, labels, drawn, needed = [], [], [], 0, 0
    for batch, im in stream:
        drawn += len(batch)
        for s, x, c in zip(batch, im, np.asarray(classify(im)).tolist()):
            if have == quotas:
                break
            needed += 1
            if have[c] < quotas[c]:
                have[c] += 1
                imgs.append(x)
                seeds.append(int(s))
                labels.append(int(c))
        if have == quotas:
            return {"images": np.stack(imgs), "seeds": seeds, "labels": labels,
                    "n_drawn": drawn, "n_needed": needed}
    raise RuntimeError(f"rejection sampling stopped after max_draws={max_draws} images with quotas "
                       f"unfilled: accepted {have} of {quotas} per class. The model rarely makes "
                       f"the short classes; raise max_draws (expected draws ~ n * max_c p_c / v_c, "
                       f"v the model's class fractions)")


def rejection_sample(pipe, judge: Judge, attr: str, target, n: int, batch_size: int = 100,
                     first_seed: int = 0, max_draws: int | None = None,
                     progress: bool = True) -> RejectionResult:
    """n images whose judge labels for ``attr`` follow ``target``, by rejecting vanilla samples.

    :param pipe: ``utils.sampling.pipeline.Pipeline``; images use seeds first_seed, first_seed + 1, ...
    :param target: class fractions [K] for ``attr`` (e.g. parity [0.5, 0.5]).
    :param max_draws: at most this many images are sampled (default 20 n); then RuntimeError.
    """
    if attr not in judge.attributes:
        raise ValueError(f"the judge has no attribute {attr!r}; it has {list(judge.attributes)}")
    quotas = class_quotas(target, n)
    if len(quotas) != len(judge.attributes[attr]):
        raise ValueError(f"target for {attr!r} has {len(quotas)} fractions but the judge has "
                         f"{len(judge.attributes[attr])} classes {judge.attributes[attr]}")
    max_draws = int(max_draws or 20 * n)
    seeds = list(range(first_seed, first_seed + max_draws))
    stream = ((b, im) for b, im, _ in sample_batches(pipe, plan_batches(seeds, batch_size),
                                                     desc=f"reject {attr}", progress=progress))

    def classify(im: np.ndarray) -> np.ndarray:
        return judge.predict(uint8_to_tensor(im))[attr].argmax(1).numpy()

    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    out = accept_from_stream(stream, classify, quotas, max_draws)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return RejectionResult(quotas=quotas, wall_s=round(time.time() - t0, 3), **out)
