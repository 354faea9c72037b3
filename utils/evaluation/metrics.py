"""Evaluation metrics: Fairness Discrepancy (with bootstrap CIs), Frechet distance, Inception FID.

FD (Choi et al., "Fair Generative Modeling via Weak Supervision", ICML 2020) compares the class
fractions a *judge* classifier (never the guide) measures on generated images with a target
distribution. The judge's own errors bias FD, so report its accuracy beside every FD.

Shapes: labels [N] int, probabilities [N, K], features [N, D], distributions [K].
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

_SUM_TOL = 1e-6


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_labels(labels, num_classes: int) -> np.ndarray:
    labels = _to_numpy(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if num_classes < 1 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _check_distribution(p, name: str) -> np.ndarray:
    p = _to_numpy(p).astype(np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D distribution, got shape {p.shape}")
    if (p < 0).any() or abs(p.sum() - 1.0) > _SUM_TOL:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {p.tolist()} "
                         f"(sum {p.sum():.6g})")
    return p


def class_fractions(labels, num_classes: int) -> np.ndarray:
    """Fraction of samples in each class: counts_k / N, shape [K], sums to 1."""
    labels = _check_labels(labels, num_classes)
    return np.bincount(labels, minlength=num_classes) / labels.size


def fairness_discrepancy(p_target, p_measured) -> float:
    """FD = ||p_target - p_measured||_2 (Choi et al. 2020).

    Range [0, sqrt(2)]; lower is better, 0 means the measured distribution equals the target.
    E.g. 80/20 measured against a 50/50 target: sqrt(0.3^2 + 0.3^2) = sqrt(0.18) ~ 0.4243.
    """
    p_t = _check_distribution(p_target, "p_target")
    p_m = _check_distribution(p_measured, "p_measured")
    if p_t.shape != p_m.shape:
        raise ValueError(f"p_target has {p_t.size} classes but p_measured has {p_m.size}")
    return float(np.linalg.norm(p_t - p_m))


def joint_labels(labels_by_attr: Mapping[str, np.ndarray],
                 num_classes_by_attr: Mapping[str, int]) -> np.ndarray:
    """One label [N] over the product of classes: row-major, the first attribute varies slowest.

    For attributes a (K_a classes) then b (K_b classes): joint = label_a * K_b + label_b.
    """
    if not labels_by_attr:
        raise ValueError("labels_by_attr is empty")
    missing = [a for a in labels_by_attr if a not in num_classes_by_attr]
    if missing:
        raise ValueError(f"num_classes_by_attr lacks attribute(s) {missing}")
    names = list(labels_by_attr)
    labels = [_check_labels(labels_by_attr[a], int(num_classes_by_attr[a])) for a in names]
    sizes = {a: l.size for a, l in zip(names, labels)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every attribute needs one label per sample, got sizes {sizes}")
    dims = tuple(int(num_classes_by_attr[a]) for a in names)
    return np.ravel_multi_index(tuple(labels), dims).astype(np.int64)


def joint_target(targets: Mapping[str, np.ndarray]) -> np.ndarray:
    """Outer product of the marginal targets, flattened like ``joint_labels`` (first slowest).

    Assumes the attributes are independent in the target, e.g. 50/50 x 50/50 -> [.25]*4.
    """
    if not targets:
        raise ValueError("targets is empty")
    marginals = [_check_distribution(p, f"target[{a!r}]") for a, p in targets.items()]
    return functools.reduce(np.multiply.outer, marginals).ravel()


def joint_fairness_discrepancy(labels_by_attr: Mapping[str, np.ndarray],
                               targets: Mapping[str, np.ndarray]) -> float:
    """FD of the joint class fractions against the product of the marginal targets.

    Range [0, sqrt(2)], lower is better. Catches bias a marginal FD misses (e.g. all women
    young, all men old with 50/50 marginals).
    """
    if list(labels_by_attr) != list(targets):
        raise ValueError(f"labels_by_attr attributes {list(labels_by_attr)} must match targets "
                         f"{list(targets)} (same order)")
    nums = {a: len(_to_numpy(p)) for a, p in targets.items()}
    joint = joint_labels(labels_by_attr, nums)
    measured = class_fractions(joint, int(np.prod(list(nums.values()))))
    return fairness_discrepancy(joint_target(targets), measured)


def bootstrap_fd(labels, p_target, num_classes: int, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """FD with a percentile bootstrap confidence interval: returns (fd, lo, hi).

    Resampling N labels with replacement gives class counts ~ Multinomial(N, p_hat), so each
    bootstrap replicate draws its counts directly (exactly the same distribution, O(K) each).
    lo / hi are the alpha/2 and 1-alpha/2 quantiles of the replicate FDs. Near FD = 0 the
    replicates are biased upward (a norm is >= 0), so the interval may then exclude fd.
    """
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    labels = _check_labels(labels, num_classes)
    p_t = _check_distribution(p_target, "p_target")
    if p_t.size != num_classes:
        raise ValueError(f"p_target has {p_t.size} classes, expected num_classes={num_classes}")
    p_hat = class_fractions(labels, num_classes)
    counts = np.random.default_rng(seed).multinomial(labels.size, p_hat, size=n_boot)
    fds = np.linalg.norm(counts / labels.size - p_t, axis=1)
    lo, hi = np.quantile(fds, [alpha / 2, 1 - alpha / 2])
    return fairness_discrepancy(p_t, p_hat), float(lo), float(hi)


def expected_untargeted(cells_vanilla, labels_b_vanilla, p_target_cells, num_b: int) -> np.ndarray | None:
    """p*(B) = sum_a p_target(a) P_vanilla(B | a) [num_b]: the distribution an attribute B that a
    run does not target would have if each targeted cell a kept the vanilla run's own mix of B.
    ``cells_vanilla`` [N]: each vanilla image's targeted cell (``joint_labels`` over the targeted
    attributes). None when a cell with a positive target has no vanilla image (undefined)."""
    cells = _to_numpy(cells_vanilla).astype(np.int64)
    b = _check_labels(labels_b_vanilla, num_b)
    p_t = _check_distribution(p_target_cells, "p_target_cells")
    out = np.zeros(num_b)
    for a, share in enumerate(p_t):
        sel = cells == a
        if share > 0 and not sel.any():
            return None
        if share > 0:
            out += share * class_fractions(b[sel], num_b)
    return out


def preservation_drift(cells_vanilla, labels_b_vanilla, p_target_cells, labels_b_guided, num_b: int,
                       n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict | None:
    """drift(B) = ||p_guided(B) - p*(B)||_2 (lower is better, 0: B kept its within-cell mix),
    with a percentile bootstrap interval that resamples both the vanilla and the guided images.
    Returns {expected, observed, drift, drift_ci} or None when p*(B) is undefined."""
    want = expected_untargeted(cells_vanilla, labels_b_vanilla, p_target_cells, num_b)
    if want is None:
        return None
    g = _check_labels(labels_b_guided, num_b)
    cells, b = _to_numpy(cells_vanilla).astype(np.int64), _check_labels(labels_b_vanilla, num_b)
    observed = class_fractions(g, num_b)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        iv, ig = rng.integers(0, len(b), len(b)), rng.integers(0, len(g), len(g))
        w = expected_untargeted(cells[iv], b[iv], p_target_cells, num_b)
        if w is not None:
            reps.append(np.linalg.norm(class_fractions(g[ig], num_b) - w))
    lo, hi = (np.quantile(reps, [alpha / 2, 1 - alpha / 2]) if reps else (np.nan, np.nan))
    return {"expected": want.tolist(), "observed": observed.tolist(),
            "drift": float(np.linalg.norm(observed - want)), "drift_ci": [float(lo), float(hi)]}


def confident_share(probs, threshold: float = 0.9) -> float:
    """Share of samples whose top class probability is >= threshold. Range [0, 1].

    Higher means the judge is sure of more images; a low share flags off-domain images.
    """
    probs = _to_numpy(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be [N, K] with N > 0, got shape {probs.shape}")
    return float((probs.max(axis=1) >= threshold).mean())


def evaluate_attributes(probs_by_attr: Mapping[str, np.ndarray | torch.Tensor],
                        targets: Mapping[str, np.ndarray] | None = None, n_boot: int = 1000,
                        seed: int = 0, alpha: float = 0.05, threshold: float = 0.9) -> dict:
    """Summarise a judge's [N, K] probabilities per attribute (JSON-ready dict).

    Per attribute: ``fractions`` of argmax predictions, ``mean_probs``, ``confident_share`` and,
    when a target is given, ``target``, ``fd`` and its bootstrap ``fd_ci`` [lo, hi].
    With >= 2 attributes, ``joint`` holds the joint fractions (first attribute slowest) and,
    when every attribute has a target, the joint FD against the product of the targets.
    """
    if not probs_by_attr:
        raise ValueError("probs_by_attr is empty")
    targets = dict(targets or {})
    unknown = sorted(set(targets) - set(probs_by_attr))
    if unknown:
        raise ValueError(f"targets for attribute(s) {unknown} that have no probabilities; "
                         f"known: {list(probs_by_attr)}")
    out: dict = {"attributes": {}}
    labels, nums = {}, {}
    for name, probs in probs_by_attr.items():
        probs = _to_numpy(probs).astype(np.float64)
        if probs.ndim != 2 or probs.shape[0] == 0:
            raise ValueError(f"probs for {name!r} must be [N, K] with N > 0, got {probs.shape}")
        labels[name], nums[name] = probs.argmax(axis=1), probs.shape[1]
        res = {"num_classes": nums[name], "n": int(probs.shape[0]),
               "fractions": class_fractions(labels[name], nums[name]).tolist(),
               "mean_probs": probs.mean(axis=0).tolist(),
               "confident_share": confident_share(probs, threshold)}
        if name in targets:
            target = _check_distribution(targets[name], f"target[{name!r}]")
            fd, lo, hi = bootstrap_fd(labels[name], target, nums[name], n_boot, seed, alpha)
            res.update(target=target.tolist(), fd=fd, fd_ci=[lo, hi])
        out["attributes"][name] = res
    if len(probs_by_attr) >= 2:
        joint = joint_labels(labels, nums)
        k = int(np.prod(list(nums.values())))
        res = {"attributes": list(nums), "num_classes": k,
               "fractions": class_fractions(joint, k).tolist()}
        if set(targets) == set(probs_by_attr):
            target = joint_target({a: targets[a] for a in probs_by_attr})
            fd, lo, hi = bootstrap_fd(joint, target, k, n_boot, seed, alpha)
            res.update(target=target.tolist(), fd=fd, fd_ci=[lo, hi])
        out["joint"] = res
    return out


def frechet_distance(feats_a, feats_b, weights_b=None) -> float:
    """Frechet distance of Gaussians fitted to two feature sets [N, D] and [M, D] (float64).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), S the unbiased covariances.
    Tr (S_a S_b)^{1/2} = sum_i sqrt(lambda_i(S_a^{1/2} S_b S_a^{1/2})), a symmetric PSD matrix,
    so only symmetric eigen-decompositions are needed (negative round-off clipped to 0). When
    min(N, M) <= D it is the nuclear norm of A B^T (S_a = A^T A, A = centred X_a / sqrt(N-1)),
    an [N, M] SVD instead of [D, D] eigen-decompositions. ``weights_b`` [M] (>= 0, frequency
    weights: weight k counts as k copies) fits the second Gaussian to a reweighted set, e.g.
    real images reweighted to a target class mix.
    Range [0, inf); lower is better, 0 for identical statistics. FID is this on Inception features.
    """
    a, b = (_to_numpy(f).astype(np.float64) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {a.shape} "
                         f"and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need >= 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}")
    w = np.ones(len(b)) if weights_b is None else np.asarray(weights_b, dtype=np.float64)
    if w.shape != (len(b),) or (w < 0).any() or w.sum() <= 1:
        raise ValueError(f"weights_b must be [{len(b)}] non-negative numbers summing to > 1")
    mu_a, mu_b = a.mean(axis=0), (w[:, None] * b).sum(0) / w.sum()
    ca = (a - mu_a) / np.sqrt(len(a) - 1)          # frequency weights: weight k = k copies
    cb = np.sqrt(w)[:, None] * (b - mu_b) / np.sqrt(w.sum() - 1)
    tr_a, tr_b = np.sum(ca ** 2), np.sum(cb ** 2)
    if min(a.shape[0], b.shape[0]) <= a.shape[1]:
        tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    else:
        s_a, s_b = ca.T @ ca, cb.T @ cb
        wa, v = np.linalg.eigh(s_a)
        sqrt_a = (v * np.sqrt(np.clip(wa, 0.0, None))) @ v.T
        m = sqrt_a @ s_b @ sqrt_a
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    d2 = np.sum((mu_a - mu_b) ** 2) + tr_a + tr_b - 2.0 * tr_sqrt
    return float(max(d2, 0.0))


# ---------------------------------------------------------------------------------------------
# FID with Inception-v3 features. Nothing is ever downloaded: the user supplies one of two files.
# ---------------------------------------------------------------------------------------------
TORCHSCRIPT_INCEPTION = ("inception-2015-12-05.pt", "https://nvlabs-fi-cdn.nvidia.com/"
                         "stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")
PYTORCH_FID_INCEPTION = ("pt_inception-2015-12-05-6726825d.pth", "https://github.com/mseitzer/"
                         "pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
_FILES_HELP = (f"FID needs a local Inception-v3 file, either {TORCHSCRIPT_INCEPTION[0]} (TorchScript, "
               f"as used by clean-fid; torch alone runs it) from {TORCHSCRIPT_INCEPTION[1]} or "
               f"{PYTORCH_FID_INCEPTION[0]} (needs `pip install pytorch-fid` and a torchvision that "
               f"matches your torch) from {PYTORCH_FID_INCEPTION[1]}. Nothing is downloaded for you.")


def _images_to_bytes(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] (C = 1 or 3) -> float [N, 3, H, W] in [0, 255], quantised."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W] in [-1, 1], got {tuple(images.shape)}")
    images = images.detach().float().cpu().expand(-1, 3, -1, -1)
    return ((images.clamp(-1, 1) + 1) * 127.5).round()


def _clean_resize(batch: torch.Tensor, size: int = 299) -> torch.Tensor:
    """clean-fid's "clean" resize: PIL bicubic on each float channel, clipped to [0, 255]."""
    from PIL import Image
    out = np.empty((batch.shape[0], 3, size, size), dtype=np.float32)
    for i, img in enumerate(batch.numpy().astype(np.float32)):
        for c in range(3):
            out[i, c] = np.asarray(Image.fromarray(img[c], mode="F").resize(
                (size, size), resample=Image.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out)


def _torchscript_extractor(path: Path, device):
    with warnings.catch_warnings():     # torch >= 2.9 flags torch.jit as deprecated; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(path), map_location=device).eval()
    # as clean-fid's InceptionV3W: resize outside, (x - 128) / 128, then the network's layers
    return lambda x: net.layers((_clean_resize(x).to(device) - 128) / 128).reshape(len(x), -1)


def _pytorch_fid_extractor(path: Path, device):
    try:
        from pytorch_fid import inception as pfi
    except ImportError as e:
        if e.name == "pytorch_fid":
            raise ImportError(f"{path.name} is read through pytorch-fid: `pip install pytorch-fid`"
                              f" (or use {TORCHSCRIPT_INCEPTION[0]}, which needs only torch)") from e
        raise ImportError(f"pytorch-fid failed to import ({e}); it needs a torchvision that matches "
                          f"torch {torch.__version__}. Use {TORCHSCRIPT_INCEPTION[0]} instead, "
                          f"which needs only torch: {TORCHSCRIPT_INCEPTION[1]}") from e
    except RuntimeError as e:           # a torchvision built for another torch fails at import
        raise ImportError(f"torchvision does not work with torch {torch.__version__} ({e}); use "
                          f"{TORCHSCRIPT_INCEPTION[0]} instead: {TORCHSCRIPT_INCEPTION[1]}") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    # pytorch-fid only fetches its weights by URL; hand it the local file's weights instead.
    fetch, pfi.load_state_dict_from_url = pfi.load_state_dict_from_url, lambda *a, **k: state
    try:
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    finally:
        pfi.load_state_dict_from_url = fetch
    # pytorch-fid takes [0, 1] images, resizes bilinearly to 299 and rescales to [-1, 1] itself
    return lambda x: net((x / 255).to(device))[0].reshape(len(x), -1)


@torch.no_grad()
def inception_features(images: torch.Tensor, weights_path: str | Path, batch_size: int = 50,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """Inception-v3 pool features [N, 2048] (float64) of images [N, 1|3, H, W] in [-1, 1].

    ``*.pt``: the TorchScript network clean-fid uses, with clean-fid's "clean" preprocessing
    (uint8 quantisation, PIL bicubic resize to 299). ``*.pth``: pytorch-fid's network and
    preprocessing. Raises FileNotFoundError (saying which file and where to get it) if missing.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path}. {_FILES_HELP}")
    if path.suffix == ".pt":
        extract = _torchscript_extractor(path, device)
    elif path.suffix == ".pth":
        extract = _pytorch_fid_extractor(path, device)
    else:
        raise ValueError(f"unknown Inception weights file {path.name}. {_FILES_HELP}")
    pixels = _images_to_bytes(images)
    feats = [extract(pixels[i:i + batch_size]).double().cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(feats).numpy()


def fid_inception(images_a: torch.Tensor, images_b: torch.Tensor, weights_path: str | Path,
                  batch_size: int = 50, device: str | torch.device = "cpu") -> float:
    """FID = frechet_distance of the Inception features of two image sets in [-1, 1].

    Range [0, inf); lower is better. Use >= 2k images per set; FID is biased upward for small N,
    so compare only numbers computed with the same N, weights file and preprocessing.
    """
    return frechet_distance(inception_features(images_a, weights_path, batch_size, device),
                            inception_features(images_b, weights_path, batch_size, device))
