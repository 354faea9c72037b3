"""Judge a set of generated images: attribute fractions, FD (with bootstrap CI), raw and corrected
for the judge's own errors where it carries its confusion (utils/evaluation/correction.py),
feature-space Frechet distance to held-out real images, and the share the judge recognises
confidently."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from models.judge import Judge, is_named_judge, load_judge
from models.files import resolve_path
from utils.sampling.images import read_images
from utils.evaluation.correction import corrected_attributes
from utils.evaluation.metrics import (bootstrap_fd, confident_share, evaluate_attributes, frechet_distance,
                                      joint_labels, preservation_drift)


def judge_from_config(cfg: dict) -> Judge:
    if not cfg.get("judge"):
        raise ValueError(f"config {cfg.get('name')} names no judge; pass one with --judge")
    spec = cfg["judge"]
    return load_judge(spec if is_named_judge(spec) or isinstance(spec, dict) else str(resolve_path(spec)))


def image_size(cfg: dict) -> int:
    """The side of a config's images: ``model.image_size`` (unconditional U-Nets) or
    ``model.resolution`` (text-to-image pipelines)."""
    m = cfg.get("model") or {}
    if "image_size" not in m and "resolution" not in m:
        raise ValueError(f"config {cfg.get('name')}: model has neither image_size nor resolution")
    return int(m.get("image_size", m.get("resolution")))


def _digits_reference(cfg: dict) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    from models.digits import attribute_labels, load_split
    split = load_split(image_size(cfg))
    return split.heldout_x, attribute_labels(split.heldout_y)


#: real reference sets by the config's ``reference:`` name -> cfg -> (images, attribute labels)
REFERENCES = {"digits": _digits_reference}


def _reference(cfg: dict):
    name = cfg.get("reference")
    if name is None:
        return None
    if name not in REFERENCES:
        raise ValueError(f"config {cfg.get('name')}: unknown reference set {name!r}; known: {sorted(REFERENCES)}")
    return REFERENCES[name](cfg)


def real_reference(cfg: dict) -> torch.Tensor | None:
    """Held-out real images for the Frechet distance (the config's ``reference:``), or None."""
    ref = _reference(cfg)
    return None if ref is None else ref[0]


def real_reference_labels(cfg: dict) -> dict[str, np.ndarray] | None:
    """The reference images' attribute labels, or None."""
    ref = _reference(cfg)
    return None if ref is None else ref[1]


def target_weights(labels: dict[str, np.ndarray], targets: dict[str, list[float]]) -> np.ndarray | None:
    """Per-image weights [M] that give a labelled real set the targets' class mix: weight =
    target cell / observed cell share, the cells being those of a joint key ('a*b') if there is
    one, else of the targeted attributes with the product of their targets. None if nothing
    applies or a targeted cell has no real image."""
    joint = [k for k in targets if "*" in k and all(a in labels for a in k.split("*"))]
    if joint:                 # a joint target 'a*b': its own cells (first attribute slowest)
        key = joint[0]
        want = np.asarray(targets[key], dtype=np.float64)
        parts = key.split("*")
        sizes = [int(labels[a].max()) + 1 for a in parts]
        if int(np.prod(sizes)) != len(want):
            return None
        cells = joint_labels({a: labels[a] for a in parts}, dict(zip(parts, sizes)))
        have = np.bincount(cells, minlength=len(want)) / len(cells)
        return None if ((want > 0) & (have == 0)).any() else want[cells] / have[cells]
    attrs = [a for a in targets if a in labels]
    if not attrs:
        return None
    cells = joint_labels({a: labels[a] for a in attrs}, {a: len(targets[a]) for a in attrs})
    want = np.ones(1)
    for a in attrs:
        want = np.outer(want, np.asarray(targets[a], dtype=np.float64)).ravel()
    have = np.bincount(cells, minlength=len(want)) / len(cells)
    if ((want > 0) & (have == 0)).any():
        return None
    return want[cells] / have[cells]


def evaluate_images(images: torch.Tensor, judge: Judge, targets: dict[str, list[float]] | None,
                    real: torch.Tensor | None = None, attrs: list[str] | None = None,
                    threshold: float = 0.9, real_labels: dict[str, np.ndarray] | None = None,
                    match: dict[str, list[float]] | None = None,
                    vanilla_probs: dict[str, torch.Tensor] | None = None) -> dict:
    """A JSON-ready report for images [N,C,H,W] in [-1,1]. With ``real_labels`` it also gives
    ``frechet_matched``: the Frechet distance to the real images reweighted to the class mix
    ``match`` (default: the targets), i.e. image quality with the intended shift of attributes
    taken out (for vanilla sampling, pass the training data's mix). With ``vanilla_probs`` (the
    judge on a vanilla run of the same model and seeds) it also gives ``drift``: per attribute
    the targets leave out, how far it moved from keeping each targeted cell's own mix.
    Per attribute, ``fractions_corrected`` / ``fd_corrected`` (with ``_ci``) correct for the
    judge's confusion (None when the judge has none stored); joint FDs are not corrected (None)."""
    probs = judge.predict(images)
    attrs = attrs or list(probs)
    targets = dict(targets or {})
    joint_keys = [k for k in targets if "*" in k]           # joint targets, e.g. parity*magnitude
    report = evaluate_attributes({a: probs[a] for a in attrs},
                                 {a: np.asarray(v) for a, v in targets.items() if a in attrs})
    corrected = corrected_attributes({a: np.asarray(probs[a]).argmax(1) for a in attrs},
                                     {a: v for a, v in targets.items() if a in attrs},
                                     judge.confusion_counts())
    for a, fields in corrected.items():
        report["attributes"][a].update(fields)
    guided = [a for a in targets if a in attrs]
    if len(guided) >= 2:      # joint distribution over the attributes that have targets
        sub = evaluate_attributes({a: probs[a] for a in guided},
                                  {a: np.asarray(targets[a]) for a in guided})
        report["joint"] = {**sub["joint"], "fd_corrected": None} if "fd" in sub["joint"] else sub["joint"]
    for key in joint_keys:    # FD of the joint fractions against the given joint target
        parts = key.split("*")
        sub = evaluate_attributes({a: probs[a] for a in parts})["joint"]
        k = sub["num_classes"]
        labels = joint_labels({a: np.asarray(probs[a]).argmax(1) for a in parts},
                              {a: probs[a].shape[1] for a in parts})
        fd, lo, hi = bootstrap_fd(labels, np.asarray(targets[key]), k)
        report.setdefault("joint_targets", {})[key] = {**sub, "target": list(targets[key]),
                                                       "fd": fd, "fd_ci": [lo, hi], "fd_corrected": None}
    if vanilla_probs is not None and targets:
        report["drift"] = drift_report(vanilla_probs, probs, targets)
    main_attr = max(probs, key=lambda a: probs[a].shape[1])     # the finest attribute (digits: digit)
    report["n"] = int(len(images))
    report["confident_share"] = confident_share(probs[main_attr], threshold)
    report["confident_on"] = main_attr
    if real is not None and hasattr(judge, "features"):
        fake, ref = judge.features(images).double().numpy(), judge.features(real).double().numpy()
        report["frechet"] = frechet_distance(fake, ref)
        mix = match if match is not None else targets
        w = target_weights(real_labels, mix) if real_labels is not None else None
        if w is not None:
            report["frechet_matched"] = frechet_distance(fake, ref, w)
            report["frechet_matched_to"] = {a: list(v) for a, v in mix.items() if a in real_labels}
    return report


def drift_report(vanilla_probs: dict, guided_probs: dict, targets: dict[str, list[float]]) -> dict:
    """{attribute not targeted: preservation_drift(...)} for targets {key: fractions} (a joint key
    'a*b' is its own cells; several keys combine as the product of their targets)."""
    order = [a for k in targets for a in k.split("*")]
    if len(set(order)) != len(order) or any(a not in vanilla_probs for a in order):
        return {}
    lab_v = {a: np.asarray(p).argmax(1) for a, p in vanilla_probs.items()}
    lab_g = {a: np.asarray(p).argmax(1) for a, p in guided_probs.items()}
    sizes = {a: np.asarray(vanilla_probs[a]).shape[1] for a in order}
    cells = joint_labels({a: lab_v[a] for a in order}, sizes)
    p_cells = functools.reduce(np.multiply.outer, [np.asarray(v, dtype=np.float64) for v in targets.values()]).ravel()
    out = {}
    for b, pv in vanilla_probs.items():
        if b not in order:
            res = preservation_drift(cells, lab_v[b], p_cells, lab_g[b], np.asarray(pv).shape[1])
            if res is not None:
                out[b] = res
    return out


def fd_cell(m: dict, key: str = "fd") -> str:
    """'0.390 [0.352, 0.426]' from a report's ``key`` and ``key_ci`` ('fd' or 'fd_corrected'); '-' if absent or None."""
    if m.get(key) is None:
        return "-"
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def fractions_cell(m: dict, digits: int = 3) -> str:
    """'0.776/0.224', then ' (corr. 0.778/0.222)' when the judge-corrected fractions are there."""
    text = "/".join(f"{v:.{digits}f}" for v in m["fractions"])
    if m.get("fractions_corrected") is not None:
        text += " (corr. " + "/".join(f"{v:.{digits}f}" for v in m["fractions_corrected"]) + ")"
    return text


def format_table(rows: list[tuple[str, dict]], attrs: list[str]) -> str:
    """A Markdown table: run, per-attribute fractions (raw, then judge-corrected), FD and corrected
    FD, joint FD, Frechet, confident share."""
    head = ["run"] + [f"{a} fractions" for a in attrs]
    head += [h for a in attrs for h in (f"FD {a}", f"corrected FD {a}")]
    if len(attrs) > 1:
        head.append("joint FD")
    head += ["Frechet (judge feats)", "confident share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        at = r["attributes"]
        cells = [name] + [fractions_cell(at[a]) for a in attrs]
        cells += [fd_cell(at[a], k) for a in attrs for k in ("fd", "fd_corrected")]
        if len(attrs) > 1:
            cells.append(f"{r['joint']['fd']:.3f}" if "fd" in r.get("joint", {}) else "-")
        cells += [f"{r['frechet']:.2f}" if "frechet" in r else "-", f"{r['confident_share']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_folder(folder: Path, cfg: dict, targets: dict | None = None,
                    judge: Judge | None = None) -> dict:
    _, x = read_images(folder)
    return evaluate_images(x, judge or judge_from_config(cfg), targets, real_reference(cfg))
