"""Judge a set of generated images: attribute fractions, FD (with bootstrap CI), raw and corrected
for the judge's own errors where it carries its confusion (utils/evaluation/correction.py),
feature-space Frechet distance to held-out real images, and the share the judge recognises
confidently."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

from models.judge import Judge, is_named_judge, load_judge
from models.files import resolve_path
from utils.config import RunConfig
from utils.sampling.images import read_images
from utils.evaluation.correction import corrected_attributes
from utils.evaluation.metrics import (bootstrap_fd, confident_share, evaluate_attributes, frechet_distance,
                                      joint_labels, preservation_drift)


def judge_from_config(cfg: dict) -> Judge:
    rc = RunConfig.of(cfg, require_model=False)
    if not rc.judge:
        raise ValueError(f"config {rc.name} names no judge; pass one with --judge")
    spec = rc.judge
    return load_judge(spec if is_named_judge(spec) or isinstance(spec, dict) else str(resolve_path(spec)))


def image_size(cfg: dict) -> int:
    """The side of a config's images: ``model.image_size`` (unconditional U-Nets) or
    ``model.resolution`` (text-to-image pipelines)."""
    rc = RunConfig.of(cfg)
    m = rc.model
    if "image_size" not in m and "resolution" not in m:
        raise ValueError(f"config {rc.name}: model has neither image_size nor resolution")
    return int(m.get("image_size", m.get("resolution")))


def _digits_reference(cfg: dict) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    from models.digits import attribute_labels, load_split
    split = load_split(image_size(cfg))
    return split.heldout_x, attribute_labels(split.heldout_y)


#: real reference sets by the config's ``reference:`` name -> cfg -> (images, attribute labels)
REFERENCES = {"digits": _digits_reference}


def _reference(cfg: dict):
    name = RunConfig.of(cfg).reference
    if name is None:
        return None
    if name not in REFERENCES:
        raise ValueError(f"config {RunConfig.of(cfg).name}: unknown reference set {name!r}; known: {sorted(REFERENCES)}")
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


def check_evaluable(cfg: dict, judge: Judge, targets: dict[str, list[float]] | None = None) -> None:
    """Raise a ValueError for what would stop an evaluation with this config, judge and targets,
    cheaply and before any image is made: an unknown ``reference:``, a reference without an
    image size, a judge with no attributes, a target whose number of fractions is not the
    judge's number of classes. A judge without features is no error: the Frechet distance is
    then reported as not available, and targets of attributes the judge lacks as not judged."""
    name = RunConfig.of(cfg).reference
    if name is not None:
        if name not in REFERENCES:
            raise ValueError(f"config {RunConfig.of(cfg).name}: unknown reference set {name!r}; known: {sorted(REFERENCES)}")
        image_size(cfg)
    if not judge.attributes:
        raise ValueError(f"the judge ({type(judge).__name__}) measures no attribute; give another with --judge")
    for key, want in (targets or {}).items():
        parts = key.split("*")
        if not all(a in judge.attributes for a in parts):
            continue
        k = math.prod(len(judge.attributes[a]) for a in parts)
        if len(want) != k:
            classes = " x ".join(f"{a} {judge.attributes[a]}" for a in parts)
            raise ValueError(f"target {key} has {len(want)} fractions but the judge's {key} has {k} classes "
                             f"({classes}); give a target with {k} fractions or a judge with these classes")


def _frechet_fields(judge: Judge, images: torch.Tensor, real: torch.Tensor,
                    real_labels: dict[str, np.ndarray] | None, mix: dict[str, list[float]]) -> dict:
    """``frechet`` (and ``frechet_matched`` to the real images reweighted to ``mix``) in the
    judge's feature space, or ``frechet_unavailable``: why not (no features, < 2 images)."""
    if not judge.has_features():
        return {"frechet_unavailable": f"the judge ({type(judge).__name__}) has no feature extractor"}
    if len(images) < 2:
        return {"frechet_unavailable": f"it needs >= 2 images (a covariance), got {len(images)}"}
    fake, ref = judge.features(images).double().numpy(), judge.features(real).double().numpy()
    out = {"frechet": frechet_distance(fake, ref)}
    w = target_weights(real_labels, mix) if real_labels is not None else None
    if w is not None:
        out["frechet_matched"] = frechet_distance(fake, ref, w)
        out["frechet_matched_to"] = {a: list(v) for a, v in mix.items() if a in real_labels}
    return out


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
    judge's confusion (None when the judge has none stored); joint FDs are not corrected (None).
    Targets of attributes the judge lacks are listed in ``not_judged``; when the Frechet distance
    cannot be computed (a judge without features, one image), ``frechet_unavailable`` says why."""
    probs = judge.predict(images)
    attrs = attrs or list(probs)
    targets = dict(targets or {})
    not_judged = sorted(k for k in targets if any(a not in probs for a in k.split("*")))
    targets = {k: v for k, v in targets.items() if k not in not_judged}
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
    if not_judged:
        report["not_judged"] = not_judged
    if real is not None:
        report.update(_frechet_fields(judge, images, real, real_labels, match if match is not None else targets))
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
    FD, joint FD, Frechet, confident share; below it, why a run's Frechet is not available."""
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
    lines += [f"Frechet not available for {name}: {r['frechet_unavailable']}"
              for name, r in rows if r.get("frechet_unavailable")]
    return "\n".join(lines)


class RunRecordError(ValueError):
    """A run folder's run.json cannot be read as a run record."""


#: how a broken run.json is fixed
REWRITE_RECORD = "re-run the generation (its main.py command with --overwrite) to rewrite it"


def run_record(folder: Path) -> dict | None:
    """A run folder's run.json (written by main.py), or None without one; a file that is not a
    JSON mapping is a RunRecordError naming it."""
    path = Path(folder) / "run.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunRecordError(f"{path} is not valid JSON ({e}); {REWRITE_RECORD}") from None
    if not isinstance(record, dict):
        raise RunRecordError(f"{path} is not a run record (a JSON mapping), it holds a "
                             f"{type(record).__name__}; {REWRITE_RECORD}")
    return record


def _record_field(record: dict, folder: Path, *keys: str, kind: type = dict):
    """record[keys[0]][keys[1]]...: None when absent, a RunRecordError when not of ``kind``."""
    node = record
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    if node is not None and not isinstance(node, kind):
        raise RunRecordError(f"{Path(folder) / 'run.json'}: {'.'.join(keys)} must be a {kind.__name__}, "
                             f"got {node!r:.80}; {REWRITE_RECORD}")
    return node


def record_seeds(record: dict | None, folder: Path) -> list[int] | None:
    """The seeds a run record lists (its images are ``{seed:06d}.png``), or None."""
    seeds = None if record is None else _record_field(record, folder, "seeds", kind=list)
    if seeds is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise RunRecordError(f"{Path(folder) / 'run.json'}: seeds must be integers >= 0, got {seeds!r:.80}; "
                             f"{REWRITE_RECORD}")
    return seeds


#: run.json's guidance mode -> what its ``requested`` targets are (for the printout)
RECORDED_TARGETS = {"distribution": "the run's distribution targets, from run.json",
                    "sample": "the run's sample-mode class, from run.json, as one-hot fractions"}


def recorded_targets(record: dict | None, folder: Path) -> tuple[dict[str, list[float]], str] | None:
    """(targets, what they are) a run record holds: a distribution run's requested fractions, or a
    sample run's requested class (one-hot fractions); None for a vanilla run or no record."""
    guidance = None if record is None else _record_field(record, folder, "resolved", "guidance")
    if not guidance or guidance.get("mode") not in RECORDED_TARGETS:
        return None
    requested = _record_field(record, folder, "resolved", "guidance", "requested") or {}
    if not requested or not all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                                for v in requested.values()):
        raise RunRecordError(f"{Path(folder) / 'run.json'}: resolved.guidance.requested must map each "
                             f"target to its fractions, got {requested!r:.80}; {REWRITE_RECORD}")
    return requested, RECORDED_TARGETS[guidance["mode"]]


def evaluate_folder(folder: Path, cfg: dict, targets: dict | None = None,
                    judge: Judge | None = None) -> dict:
    """``evaluate_images`` on a run folder: the images of the seeds its run.json lists (every one
    must be there), else every ``<seed>.png`` in it. ``targets`` None: those run.json records
    (a distribution run's targets, a sample run's class; ``targets_from`` says which); {}: none."""
    record = run_record(folder)
    _, x = read_images(folder, record_seeds(record, folder))
    source = None
    if targets is None:
        targets, source = recorded_targets(record, folder) or ({}, None)
    judge = judge or judge_from_config(cfg)
    check_evaluable(cfg, judge, targets)
    report = evaluate_images(x, judge, targets, real_reference(cfg))
    if source:
        report["targets_from"] = source
    return report
