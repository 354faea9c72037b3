"""Train the ADP's per-timestep linear heads on extracted h-vectors (cross-entropy per step).

One trainer for h left on disk (``utils.data.extract.HShards``: an extraction folder read by
rows) and h held in memory (``TensorSource``). Every pass reads h in chunks of at most
``chunk_elems`` values, so memory is one chunk plus the ADP's parameters and optimiser state,
whatever the number of samples N; only the labels and sample indices ([N] integers) are whole.

1. a seeded split of the sample indices (``split_indices``);
2. per-step standardisation: the exact mean and std of the training samples, float64 chunk
   statistics merged as they come (``mean_std``);
3. AdamW epochs over mini-batches in a seeded shuffle of all training samples; a batch gathers
   its rows from whichever shards hold them, in micro-batches of at most ``chunk_elems`` values
   whose gradients add up to the batch's;
4. guidance directions (``ADP.directions_from_chunks``), confusion matrices
   (``ADP.calibrate_from_chunks``) and validation accuracy, one streaming pass each.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.adp import ADP

log = logging.getLogger(__name__)

#: h values per chunk or micro-batch (at least one sample): 4M, 16 MB as float32. Larger chunks
#: are no faster (the work per value is the same) and leave more freed memory behind in the heap.
CHUNK_ELEMS = 1 << 22


class HSource(Protocol):
    """Samples in shards: sample i is row ``i - sum(sizes[:k])`` of shard k."""
    sizes: list[int]
    labels: dict[str, torch.Tensor]                  # {attr: int64 [N]}

    def read(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        """h [len(rows), S, D] of the local ``rows`` of shard k."""


class TensorSource:
    """h [N,S,D] held in memory, seen as a single shard."""

    def __init__(self, h: torch.Tensor, labels: dict[str, torch.Tensor]):
        bad = {a: len(v) for a, v in labels.items() if len(v) != len(h)}
        if bad:
            raise ValueError(f"labels {bad} do not match the {len(h)} h rows")
        self.h, self.labels, self.sizes = h, labels, [len(h)]

    def read(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        return self.h[rows]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train, validation) split of n samples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * n)))
    return perm[n_val:], perm[:n_val]


def _locate(sizes: list[int], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shard, row in that shard) of each sample index."""
    ends = torch.tensor(sizes).cumsum(0)
    k = torch.bucketize(idx, ends, right=True)
    return k, idx - (ends - torch.tensor(sizes))[k]


def gather(data: HSource, idx: torch.Tensor) -> torch.Tensor:
    """h [len(idx), S, D] of the samples idx, in that order, from the shards that hold them."""
    k_of, local = _locate(data.sizes, idx)
    shards = k_of.unique().tolist()
    if len(shards) == 1:
        return data.read(shards[0], local)
    out = None
    for k in shards:
        pos = (k_of == k).nonzero().squeeze(1)
        h = data.read(k, local[pos])
        out = h.new_empty((len(idx), *h.shape[1:])) if out is None else out
        out[pos] = h
    return out


def chunks(data: HSource, idx: torch.Tensor, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(sample indices [n], h [n,S,D]) covering the samples idx in ascending order, shard by
    shard, at most ``rows`` rows at a time."""
    idx = idx.sort().values
    k_of, local = _locate(data.sizes, idx)
    for k in k_of.unique().tolist():
        sel = k_of == k
        for g, r in zip(idx[sel].split(rows), local[sel].split(rows)):
            yield g, data.read(k, r)


@torch.no_grad()
def mean_std(data: HSource, idx: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step mean and unbiased std [S,D] of the samples idx, exactly: each chunk's float64
    (count m, mean, M2 = sum of squared deviations) merged into the running ones by Chan et al.'s
    update, mean += d m / (n + m), M2 += M2_c + d^2 n m / (n + m), with d = mean_c - mean.
    One step at a time, so the float64 temporaries are [rows, D]."""
    n, mean, m2 = 0, None, None
    for _, h in chunks(data, idx, rows):
        if mean is None:
            mean = torch.zeros(h.shape[1:], dtype=torch.float64)
            m2 = torch.zeros_like(mean)
        m = len(h)
        for s in range(h.shape[1]):
            x = h[:, s].double()                                              # [m, D]
            mc = x.mean(0)
            d = mc - mean[s]
            mean[s] += d * (m / (n + m))
            m2[s] += (x - mc).square_().sum(0) + d.square_() * (n * m / (n + m))
        n += m
    return mean.float(), (m2 / max(n - 1, 1)).sqrt().float()


def _fit(adp: ADP, data: HSource, tr: torch.Tensor, epochs: int, batch_size: int, lr: float,
         weight_decay: float, seed: int, rows: int, device: str) -> None:
    """AdamW on the sum over attributes of the cross-entropy, averaged over batch and steps."""
    opt = torch.optim.AdamW(adp.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train ADP"):
        for idx in tr[torch.randperm(len(tr), generator=gen)].split(batch_size):
            # zeroed in place, not freed: gradients re-allocated every batch fragment the heap,
            # and peak memory then drifts up with the number of batches
            opt.zero_grad(set_to_none=False)
            for sub in idx.split(rows):           # micro-batch losses weighted to sum to the batch's
                hb = gather(data, sub).to(device)
                loss = sum(F.cross_entropy(adp.logits_all_steps(hb, a).flatten(0, 1),
                                           data.labels[a][sub].to(device).repeat_interleave(hb.shape[1]))
                           for a in adp.attributes)
                (loss * (len(sub) / len(idx))).backward()
            opt.step()


@torch.no_grad()
def accuracy_per_step(adp: ADP, data: HSource, idx: torch.Tensor, rows: int) -> dict[str, list[float]]:
    """Accuracy of each attribute's head at each step on the samples idx: {attr: [S] floats in
    [0, 1], the fraction whose argmax logit is the label; higher is better}."""
    correct = {a: torch.zeros(len(adp.timesteps)) for a in adp.attributes}
    for g, h in chunks(data, idx, rows):
        for a in adp.attributes:
            pred = adp.logits_all_steps(h, a).argmax(-1)                           # [n, S]
            correct[a] += (pred == data.labels[a][g, None]).float().sum(0)
    return {a: (c / len(idx)).tolist() for a, c in correct.items()}


def train_adp_stream(data: HSource, meta: dict, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                     weight_decay: float = 1e-3, val_fraction: float = 0.2, seed: int = 0,
                     device: str = "cpu", chunk_elems: int = CHUNK_ELEMS) -> tuple[ADP, dict]:
    """Fit one linear head per (attribute, timestep) on the samples of ``data``; returns (adp, metrics).

    Memory: a chunk or micro-batch of ``chunk_elems`` h values plus the ADP, independent of N.
    Metrics: per attribute, validation accuracy per timestep (same order as ``timesteps``),
    its mean over the last 20% of the denoising steps (t near 0) and over the first 10%.
    """
    bad = [f"{k} {v}" for k, v, ok in (("epochs", epochs, epochs >= 1), ("batch_size", batch_size, batch_size >= 1),
                                       ("lr", lr, math.isfinite(lr) and lr > 0),
                                       ("val_fraction", val_fraction, 0 < val_fraction < 1)) if not ok]
    if bad:
        raise ValueError(f"ADP training: {', '.join(bad)} out of range (epochs and batch_size >= 1, "
                         f"lr > 0, val_fraction in (0, 1))")
    n = sum(data.sizes)
    if n < 2 or not data.labels:
        raise ValueError(f"ADP training needs at least 2 samples with labels; got {n} samples "
                         f"labelled for {list(data.labels) or 'no attribute'}")
    torch.manual_seed(seed)
    attrs = {a: meta["attributes"][a] for a in data.labels}
    adp = ADP(tuple(meta["h_shape"]), meta["timesteps"], attrs)
    rows = max(1, chunk_elems // adp.mean.numel())                  # samples per chunk
    tr, va = split_indices(n, val_fraction, seed)
    if not len(tr):
        raise ValueError(f"val_fraction {val_fraction} leaves no training sample out of {n}")
    mean, std = mean_std(data, tr, rows)
    with torch.no_grad():
        adp.mean.copy_(mean)
        adp.std.copy_(std.clamp_min(1e-3))
    adp.to(device)
    _fit(adp, data, tr, epochs, batch_size, lr, weight_decay, seed, rows, device)
    adp.cpu().eval()
    adp.directions_from_chunks(h for _, h in chunks(data, tr, rows))
    adp.calibrate_from_chunks((h, {a: data.labels[a][g] for a in attrs}) for g, h in chunks(data, va, rows))
    counts = {a: torch.bincount(data.labels[a], minlength=len(attrs[a])) for a in attrs}
    adp.class_prior = {a: (c.double() / n).tolist() for a, c in counts.items()}   # the model's class fractions
    prompts = getattr(data, "prompts", None)
    if prompts is not None:              # text-to-image: each prompt's own class fractions
        for q in dict.fromkeys(prompts):
            of_q = torch.tensor([p == q for p in prompts])
            adp.prompt_prior[q] = {a: (torch.bincount(data.labels[a][of_q], minlength=len(attrs[a])).double()
                                       / int(of_q.sum())).tolist() for a in attrs}
    accs = accuracy_per_step(adp, data, va, rows)
    metrics = {"n_train": int(len(tr)), "n_val": int(len(va)), "epochs": epochs, "attributes": {}}
    s = len(adp.timesteps)
    late, early = max(1, int(round(0.2 * s))), max(1, s // 10)
    for a, acc in accs.items():
        metrics["attributes"][a] = {
            "val_accuracy_per_step": [round(v, 4) for v in acc],
            "val_accuracy_last_20pct": round(sum(acc[-late:]) / late, 4),
            "val_accuracy_first_10pct": round(sum(acc[:early]) / early, 4),
            "class_counts": counts[a].tolist()}
        log.info("ADP %s: val acc last 20%% of steps %.3f", a, metrics["attributes"][a]["val_accuracy_last_20pct"])
    return adp, metrics


def train_adp(h: torch.Tensor, labels: dict[str, torch.Tensor], meta: dict, **options) -> tuple[ADP, dict]:
    """``train_adp_stream`` on h [N,S,D] held in memory (one shard); same options and metrics."""
    return train_adp_stream(TensorSource(h, labels), meta, **options)
