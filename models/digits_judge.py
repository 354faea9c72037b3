"""The embedded default's judge: an independent pixel-space digit classifier (not on h).

A small CNN on 16x16 grey images predicts the digit (10 classes); ``parity`` and ``magnitude``
probabilities are sums of digit probabilities, so the three attributes never disagree. Its
64-d penultimate features give the feature-space Frechet distance (the CPU stand-in for FID).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.files import load_tensors
from models.judge import Judge
from models.digits import ATTRIBUTES, attribute_labels


class DigitsCNN(nn.Module):
    """conv x2 -> pool -> conv x2 -> pool -> 64-d features -> 10 logits, for [N,1,16,16]."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,1,16,16] in [-1,1] -> (logits [N,10], features [N,64])."""
        f = self.body(x)
        return self.head(f), f


def digit_probs_to_attributes(p_digit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Digit probabilities [N,10] -> {attribute: probabilities [N,K]} by summing classes."""
    lab = attribute_labels(np.arange(10))
    out = {"digit": p_digit}
    for attr in ("parity", "magnitude"):
        m = F.one_hot(torch.as_tensor(lab[attr]), len(ATTRIBUTES[attr])).to(p_digit)
        out[attr] = p_digit @ m
    return out


def grey(images: torch.Tensor) -> torch.Tensor:
    """[N,1|3,H,W] -> [N,1,H,W]: RGB images (a text-to-image pipeline's grey digits repeated to
    three channels) become their channel mean."""
    return images if images.shape[1] == 1 else images.float().mean(1, keepdim=True)


class DigitsJudge(Judge):
    """Wraps a trained DigitsCNN as a Judge for parity, magnitude and digit; ``meta["confusion"]``
    (scripts/calibrate_judge.py) is its confusion on labelled held-out digits."""

    attributes = ATTRIBUTES

    def __init__(self, net: DigitsCNN, meta: dict | None = None, device: str = "cpu"):
        self.net, self.meta, self.device = net.to(device).eval(), meta or {}, device
        self.calibration = self.meta.get("confusion")
        self.confusion_counts()                 # a record that does not fit fails here

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch: int = 512):
        outs = [self.net(images[i:i + batch].to(self.device).float())
                for i in range(0, len(images), batch)]
        return torch.cat([o[0] for o in outs]).cpu(), torch.cat([o[1] for o in outs]).cpu()

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return digit_probs_to_attributes(torch.softmax(self._run(grey(images))[0], dim=1))

    def has_features(self) -> bool:
        return True

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 64-d penultimate features [N, 64] of the (grey) images."""
        return self._run(grey(images))[1]

    def save(self, path: Path) -> None:
        torch.save({"kind": "digits_cnn", "state_dict": self.net.state_dict(),
                    "attributes": ATTRIBUTES, "image_size": 16, **self.meta}, path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "DigitsJudge":
        ck = load_tensors(path, "a digits judge checkpoint", ValueError)
        if not isinstance(ck, dict) or ck.get("kind") != "digits_cnn":
            raise ValueError(f"{path} is not a digits judge checkpoint (kind={ck.get('kind')!r})")
        net = DigitsCNN()
        net.load_state_dict(ck["state_dict"], strict=True)
        meta = {k: v for k, v in ck.items() if k not in ("state_dict", "kind", "attributes")}
        return cls(net, meta, device)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine warps (rotation +-12 deg, scale 0.9-1.1, shift +-1.5 px) and noise."""
    n = len(x)
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    sc = 0.9 + 0.2 * torch.rand(n, generator=gen)
    sh = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1.5 / 8)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
    theta[:, :, 2] = sh
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def train_digits_judge(x: torch.Tensor, y: np.ndarray, steps: int = 3000, batch: int = 128,
                       lr: float = 1e-3, seed: int = 0, balanced: bool = False) -> DigitsCNN:
    """Train a DigitsCNN on images x [N,1,16,16] and digit labels y [N] (augmented, Adam);
    ``balanced``: each batch draws every digit equally often (images of a rare digit repeat)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net, yt = DigitsCNN(), torch.as_tensor(y, dtype=torch.long)
    draw = (1.0 / torch.bincount(yt, minlength=10).double().clamp_min(1))[yt]   # balanced: per image
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    from tqdm import tqdm
    for _ in tqdm(range(steps), desc="train judge"):
        idx = (torch.multinomial(draw, batch, replacement=True, generator=gen) if balanced
               else torch.randint(len(x), (batch,), generator=gen))
        loss = F.cross_entropy(net(augment(x[idx], gen))[0], yt[idx], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def divide_prior(net: DigitsCNN, counts: torch.Tensor) -> DigitsCNN:
    """The network with its training data's digit prior divided out: its softmax becomes
    p(y|x) pi(y)^-1 renormalised (pi = counts / counts.sum(), the label-shift correction to equal
    priors), by subtracting log pi from the output bias. Changes net in place and returns it."""
    prior = counts.double() / counts.double().sum()
    if prior.shape != (10,) or (prior <= 0).any():
        raise ValueError(f"divide_prior needs 10 positive digit counts, got {counts.tolist()}")
    with torch.no_grad():
        net.head[-1].bias -= torch.log(prior).to(net.head[-1].bias)
    return net


class SVCLabeller(Judge):
    """A second, different classifier for pseudo-labelling generated digits (not the judge).

    An RBF support-vector machine on raw pixels, fitted in about a second on the DDPM's own
    training subset (the data a model owner has), so that the ADP's labels and the judge that
    measures FD come from independent classifiers.
    """

    attributes = ATTRIBUTES

    def __init__(self, seed: int = 0, prior: str = "train"):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC
        from models.digits import load_split
        if prior not in ("train", "uniform"):
            raise ValueError(f"SVCLabeller prior {prior!r}: give 'train' or 'uniform'")
        split = load_split()
        # p(y|x) under the training subset's (biased) digit prior pi; 'uniform' re-weights it to
        # equal priors, p(y|x) pi(y)^-1 renormalised (the label-shift correction of a calibrated
        # classifier), so that ambiguous images are not read as the training data's majority.
        counts = torch.bincount(torch.as_tensor(split.train_y), minlength=10).float()
        self.reweight = 1.0 / counts if prior == "uniform" else torch.ones(10)
        try:        # scikit-learn >= 1.9 deprecates SVC(probability=True) for this
            self.svc = CalibratedClassifierCV(SVC(C=10.0, gamma="scale", random_state=seed),
                                              ensemble=False)
        except TypeError:
            self.svc = SVC(C=10.0, gamma="scale", probability=True, random_state=seed)
        self.svc.fit(split.train_x.flatten(1).numpy(), split.train_y)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        p = torch.as_tensor(self.svc.predict_proba(grey(images).float().flatten(1).numpy()),
                            dtype=torch.float32) * self.reweight
        return digit_probs_to_attributes(p / p.sum(1, keepdim=True))
