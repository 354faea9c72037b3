"""Per-prompt fairness of a text-to-image model, in the three figures the text-to-image debiasing
papers report (ITI-GEN, Zhang et al. ICCV 2023; Fair Diffusion, Friedrich et al. 2023; Shen et al.,
"Finetuning Text-to-Image Diffusion Models for Fairness", ICLR 2024; UCE, Gandikota et al. 2024).

For the N images one prompt generated, a judge's argmax labels give the class distribution p [K]
(``class_fractions``), compared with a target u [K]:

- FD = ||p - u||_2 (Choi et al. 2020; ``metrics.fairness_discrepancy``), range [0, sqrt(2)];
- KL(p || u) = sum_k p_k ln(p_k / u_k), in nats: the divergence *of the judged distribution from
  the target*, the direction ITI-GEN reports against the uniform. Zero cells: 0 ln 0 = 0 (the exact
  limit, so p_k = 0 adds nothing); a target cell u_k = 0 is raised to ``eps`` and u renormalised,
  so a class the target excludes costs about p_k ln(p_k / eps) instead of infinity. Range [0, inf);
- parity gap = max_k p_k - min_k p_k: for two classes |p_0 - p_1|, the gap Shen et al. report as
  the bias of a prompt; for K classes the largest gap between two classes. Range [0, 1]. It
  measures the distance from *equal* shares whatever the target (0 only for a uniform p).

Lower is better for all three. Each is given raw and corrected for the judge's own errors: with
the judge's confusion counts (rows: true class), p_corrected = Pi_simplex((M^T)^+ p_hat)
(``correction.correct_fractions``). Intervals are percentile bootstraps over the images (counts
~ Multinomial(N, p_hat), the same draws as ``metrics.bootstrap_fd`` under the same seed), the
corrected ones also over M (each row ~ Dirichlet(counts + 1/K), as ``correction.bootstrap_corrected``).

Shapes: labels [N] int, probabilities [N, K], distributions [K], counts [K, K].
"""
from __future__ import annotations

import math

import numpy as np

from utils.evaluation.correction import _sample_matrices, bootstrap_corrected, correct_fractions
from utils.evaluation.metrics import _check_distribution, _check_labels, _to_numpy, bootstrap_fd, class_fractions

#: the metrics of a row besides the fractions, in table order
METRICS = ("fd", "kl", "parity_gap")
#: default floor of a target cell in the KL
KL_EPS = 1e-6


def kl_to_target(p, target, eps: float = KL_EPS) -> float:
    """KL(p || u) = sum_{k: p_k > 0} p_k ln(p_k / u'_k) in nats, u' = max(u, eps) renormalised.
    p, target [K] (or p [B, K] -> [B] as an array). E.g. p = 0.7/0.3, u = 0.5/0.5:
    0.7 ln 1.4 + 0.3 ln 0.6 ~ 0.0823. Range [0, inf), lower is better."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    u = _check_distribution(target, "target")
    p = _check_distribution(p, "p") if np.ndim(p) == 1 else np.asarray(p, dtype=np.float64)
    if p.shape[-1] != u.size:
        raise ValueError(f"p has {p.shape[-1]} classes but the target {u.size}")
    u = np.maximum(u, eps)
    u = u / u.sum()
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / u), 0.0)
    kl = np.maximum(terms.sum(axis=-1), 0.0)       # >= 0 by Gibbs' inequality; clip round-off
    return float(kl) if kl.ndim == 0 else kl


def parity_gap(p):
    """max_k p_k - min_k p_k of p [K] (p [B, K] -> [B]): |p_0 - p_1| for two classes. E.g.
    0.7/0.3 -> 0.4. Range [0, 1], 0 for equal shares."""
    p = _check_distribution(p, "p") if np.ndim(p) == 1 else np.asarray(p, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] < 2:
        raise ValueError(f"p must be [K] or [B, K] with K >= 2 classes, got shape {p.shape}")
    gap = p.max(axis=-1) - p.min(axis=-1)
    return float(gap) if gap.ndim == 0 else gap


def _labels(labels_or_probs, k: int) -> np.ndarray:
    """Argmax labels [N] of probabilities [N, K], or labels [N] as given (checked against K)."""
    x = _to_numpy(labels_or_probs)
    if x.ndim == 2:
        if x.shape[1] != k:
            raise ValueError(f"probabilities have {x.shape[1]} classes but the target {k}; give a target "
                             f"with one fraction per class")
        x = x.argmax(axis=1)
    return _check_labels(x, k)


def _ci(values: np.ndarray, alpha: float) -> list:
    """The percentile interval [lo, hi] of replicates [B] ([B, K] -> [K, 2])."""
    q = np.quantile(values, [alpha / 2, 1 - alpha / 2], axis=0)
    return q.T.tolist() if values.ndim == 2 else [float(q[0]), float(q[1])]


def _summary(point: np.ndarray, reps: np.ndarray, target: np.ndarray, eps: float, alpha: float) -> dict:
    """fractions, KL and parity gap (each with ``_ci``) of a point estimate [K] and replicates [B, K]."""
    return {"fractions": point.tolist(), "fractions_ci": _ci(reps, alpha),
            "kl": kl_to_target(point, target, eps), "kl_ci": _ci(kl_to_target(reps, target, eps), alpha),
            "parity_gap": parity_gap(point), "parity_gap_ci": _ci(parity_gap(reps), alpha)}


def prompt_fairness(labels_or_probs, target, confusion=None, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05, eps: float = KL_EPS) -> dict:
    """FD, KL(p || u) and parity gap (module docstring) of one prompt's judged images, raw and
    judge-corrected, each with a percentile bootstrap interval ``<metric>_ci`` [lo, hi].

    :param labels_or_probs: the judge's labels [N] or probabilities [N, K] (argmax taken).
    :param target: u [K], non-negative, summing to 1.
    :param confusion: the judge's confusion counts [K, K] (rows: true class), or None.
    :return: {n, target, n_boot, seed, alpha, eps, raw: {fractions, fractions_ci, fd, fd_ci, kl,
        kl_ci, parity_gap, parity_gap_ci}, corrected: the same keys, or None without a confusion}.
    """
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    u = _check_distribution(target, "target")
    k = u.size
    labels = _labels(labels_or_probs, k)
    p_hat = class_fractions(labels, k)
    # the replicates bootstrap_fd and bootstrap_corrected draw with this seed, in their order
    rng = np.random.default_rng(seed)
    p_boot = rng.multinomial(labels.size, p_hat, size=n_boot) / labels.size
    fd, lo, hi = bootstrap_fd(labels, u, k, n_boot, seed, alpha)
    raw = {**_summary(p_hat, p_boot, u, eps, alpha), "fd": fd, "fd_ci": [lo, hi]}
    corrected = None
    if confusion is not None:
        counts = np.asarray(confusion, dtype=np.float64)
        if counts.shape != (k, k):
            raise ValueError(f"confusion must be the judge's [K, K] counts for the target's {k} classes, "
                             f"got shape {counts.shape}")
        got = bootstrap_corrected(labels, counts, u, n_boot, seed, alpha)
        reps = correct_fractions(p_boot, _sample_matrices(counts, n_boot, rng, 1.0 / k))
        corrected = {**_summary(np.asarray(got["fractions_corrected"]), reps, u, eps, alpha),
                     "fd": got["fd_corrected"], "fd_ci": got["fd_corrected_ci"]}
    return {"n": int(labels.size), "target": u.tolist(), "n_boot": n_boot, "seed": seed, "alpha": alpha,
            "eps": eps, "raw": raw, "corrected": corrected}


def mean_over_prompts(rows: list[dict]) -> dict:
    """The plain mean over prompts of each metric (as the papers average over their prompt lists):
    {prompts, raw: {fd, kl, parity_gap}, corrected: the same, or None unless every row has it}.
    The intervals stay per prompt (the rows')."""
    if not rows:
        raise ValueError("mean_over_prompts needs at least one prompt's row (prompt_fairness), got none")
    out = {"prompts": len(rows), "raw": {m: math.fsum(r["raw"][m] for r in rows) / len(rows) for m in METRICS},
           "corrected": None}
    if all(r.get("corrected") is not None for r in rows):
        out["corrected"] = {m: math.fsum(r["corrected"][m] for r in rows) / len(rows) for m in METRICS}
    return out
