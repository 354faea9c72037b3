"""Judge-corrected class fractions and FD (CLEAM-style: Teo et al., "On Measuring Fairness in
Generative Models", NeurIPS 2023, generalised from per-class accuracies to a confusion matrix).

A judge that errs biases the fractions it measures. With its confusion matrix
M[i, j] = P(judge argmax = j | true class i), estimated on labelled held-out data and stored with
the judge, the argmax fractions p_hat of N images satisfy E[p_hat] = M^T p_true, so
p_corrected = Pi_simplex((M^T)^+ p_hat). The bootstrap interval resamples the images *and* M.

Joint keys ('a*b') are not corrected (``fd_corrected`` None): judges such as the digits judge
derive several attributes from one prediction, so their errors are not independent and the
Kronecker product of the marginal matrices would be the wrong joint confusion.

Shapes: labels [N] int, counts / M [K, K] (rows: true class), distributions [K].
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from utils.evaluation.metrics import _check_distribution, _check_labels, class_fractions


def project_to_simplex(v) -> np.ndarray:
    """Euclidean projection of v [..., K] onto {x >= 0, sum x = 1}: x = max(v - theta, 0) with
    theta = (sum_{j<=rho} u_j - 1) / rho, u = v sorted descending, rho = max{j : u_j > (sum_{i<=j}
    u_i - 1) / j} (Held et al. 1974; Duchi et al. 2008). A valid distribution is returned as is."""
    v = np.asarray(v, dtype=np.float64)
    u = -np.sort(-v, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    j = np.arange(1, v.shape[-1] + 1)
    rho = np.sum(u > css / j, axis=-1, keepdims=True)          # the condition holds for j <= rho
    theta = np.take_along_axis(css, rho - 1, axis=-1) / rho
    return np.maximum(v - theta, 0.0)


def confusion_matrix(counts) -> np.ndarray:
    """M [..., K, K] = counts / row sums: M[i, j] = P(judge says j | true class i)."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum(axis=-1, keepdims=True)


def correct_fractions(p_hat, matrix) -> np.ndarray:
    """p_corrected [..., K] = Pi_simplex((M^T)^+ p_hat): inverts E[p_hat] = M^T p_true (the
    pseudo-inverse equals the inverse when M is invertible), then projects onto the simplex."""
    m_t = np.swapaxes(np.asarray(matrix, dtype=np.float64), -1, -2)
    raw = np.linalg.pinv(m_t) @ np.asarray(p_hat, dtype=np.float64)[..., None]
    return project_to_simplex(raw[..., 0])


def _sample_matrices(counts: np.ndarray, n: int, rng: np.random.Generator, prior: float) -> np.ndarray:
    """n confusion matrices [n, K, K], row i ~ Dirichlet(counts_i + prior) (gamma draws, normalised)."""
    g = rng.gamma(np.broadcast_to(counts + prior, (n,) + counts.shape))
    return g / g.sum(axis=-1, keepdims=True)


def bootstrap_corrected(labels, counts, p_target=None, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05, prior: float | None = None) -> dict:
    """Judge-corrected fractions (and FD = ||p_target - p_corrected||_2 when a target is given)
    with percentile bootstrap intervals that include M's uncertainty.

    Each round draws the images' class counts ~ Multinomial(N, p_hat) (as ``bootstrap_fd``, same
    seed, so the same image replicates) and every row i of M ~ Dirichlet(counts_i + prior), the
    posterior of that row under a symmetric prior (default 1/K per cell: a row that saw no error
    still allows the errors its size cannot rule out), then corrects. Returns
    {fractions_corrected, fractions_corrected_ci [K, 2], fd_corrected, fd_corrected_ci}."""
    counts = np.asarray(counts, dtype=np.float64)
    k = counts.shape[0]
    if counts.shape != (k, k) or (counts < 0).any() or (counts.sum(axis=1) <= 0).any():
        raise ValueError(f"counts must be [K, K], non-negative, every row > 0; got {counts.tolist()}")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    labels = _check_labels(labels, k)
    p_hat = class_fractions(labels, k)
    rng = np.random.default_rng(seed)
    p_boot = rng.multinomial(labels.size, p_hat, size=n_boot) / labels.size
    m_boot = _sample_matrices(counts, n_boot, rng, 1.0 / k if prior is None else prior)
    reps = correct_fractions(p_boot, m_boot)
    q = [alpha / 2, 1 - alpha / 2]
    point = correct_fractions(p_hat, confusion_matrix(counts))
    out = {"fractions_corrected": point.tolist(),
           "fractions_corrected_ci": np.quantile(reps, q, axis=0).T.tolist(),
           "fd_corrected": None, "fd_corrected_ci": None}
    if p_target is not None:
        p_t = _check_distribution(p_target, "p_target")
        if p_t.size != k:
            raise ValueError(f"p_target has {p_t.size} classes, the confusion matrix {k}")
        fds = np.linalg.norm(reps - p_t, axis=1)
        out.update(fd_corrected=float(np.linalg.norm(point - p_t)),
                   fd_corrected_ci=[float(v) for v in np.quantile(fds, q)])
    return out


#: the corrected fields of an attribute whose judge has no stored confusion
UNCORRECTED = {"fractions_corrected": None, "fractions_corrected_ci": None,
               "fd_corrected": None, "fd_corrected_ci": None}


def corrected_attributes(labels_by_attr: Mapping[str, np.ndarray], targets: Mapping[str, list],
                         confusion: Mapping[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
                         alpha: float = 0.05) -> dict[str, dict]:
    """{attribute: bootstrap_corrected(...)} for argmax labels [N]; an attribute without a stored
    confusion gets ``UNCORRECTED`` (every corrected field None); FD fields only with a target."""
    out = {}
    for a, lab in labels_by_attr.items():
        res = (bootstrap_corrected(lab, confusion[a], targets.get(a), n_boot, seed, alpha)
               if a in confusion else dict(UNCORRECTED))
        if a not in targets:                  # as the raw figures: no FD without a target
            del res["fd_corrected"], res["fd_corrected_ci"]
        out[a] = res
    return out
