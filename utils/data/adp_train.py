"""Train the ADP's per-timestep linear heads on extracted h-vectors (cross-entropy per step)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.adp import ADP

log = logging.getLogger(__name__)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train, validation) split of n samples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * n)))
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def accuracy_per_step(adp: ADP, h: torch.Tensor, y: torch.Tensor, attr: str,
                      batch: int = 256) -> list[float]:
    """Validation accuracy of the head at each timestep: list of S floats."""
    correct = torch.zeros(len(adp.timesteps))
    for i in range(0, len(h), batch):
        pred = adp.logits_all_steps(h[i:i + batch], attr).argmax(-1)     # [n, S]
        correct += (pred == y[i:i + batch, None]).float().sum(0)
    return (correct / len(h)).tolist()


def train_adp(h: torch.Tensor, labels: dict[str, torch.Tensor], meta: dict, epochs: int = 30,
              batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-3,
              val_fraction: float = 0.2, seed: int = 0, device: str = "cpu") -> tuple[ADP, dict]:
    """Fit one linear head per (attribute, timestep) on h [N,S,D]; returns (adp, metrics).

    Metrics: per attribute, validation accuracy per timestep (same order as ``timesteps``),
    its mean over the last 20% of the denoising steps (t near 0) and over the first steps.
    """
    torch.manual_seed(seed)
    attrs = {a: meta["attributes"][a] for a in labels}
    adp = ADP(tuple(meta["h_shape"]), meta["timesteps"], attrs)
    tr, va = split_indices(len(h), val_fraction, seed)
    with torch.no_grad():                          # per-step standardisation from training data
        sample = h[tr[:4096]].float()
        adp.mean.copy_(sample.mean(0))
        adp.std.copy_(sample.std(0).clamp_min(1e-3))
    adp.to(device)
    opt = torch.optim.AdamW(adp.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train ADP"):
        for idx in tr[torch.randperm(len(tr), generator=gen)].split(batch_size):
            hb = h[idx].to(device)
            loss = sum(F.cross_entropy(adp.logits_all_steps(hb, a).flatten(0, 1),
                                       labels[a][idx].to(device).repeat_interleave(hb.shape[1]))
                       for a in attrs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    adp.cpu().eval()
    adp.compute_directions(h[tr])
    adp.calibrate(h[va], {a: labels[a][va] for a in attrs})
    adp.class_prior = {a: (torch.bincount(labels[a], minlength=len(attrs[a])).double() / len(labels[a])).tolist()
                       for a in attrs}       # the model's class fractions (pseudo-labelled samples)
    metrics = {"n_train": int(len(tr)), "n_val": int(len(va)), "epochs": epochs, "attributes": {}}
    s = len(adp.timesteps)
    late = max(1, int(round(0.2 * s)))
    for a in attrs:
        acc = accuracy_per_step(adp, h[va], labels[a][va], a)
        counts = torch.bincount(labels[a], minlength=len(attrs[a])).tolist()
        metrics["attributes"][a] = {
            "val_accuracy_per_step": [round(v, 4) for v in acc],
            "val_accuracy_last_20pct": round(sum(acc[-late:]) / late, 4),
            "val_accuracy_first_10pct": round(sum(acc[:max(1, s // 10)]) / max(1, s // 10), 4),
            "class_counts": counts}
        log.info("ADP %s: val acc last 20%% of steps %.3f", a, metrics["attributes"][a]["val_accuracy_last_20pct"])
    return adp, metrics
