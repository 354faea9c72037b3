"""What to guide: target strings -> fractions or classes, refine through a finer head, and the
resolved plan (targets, scales, estimator, cap) that a Guide runs.

A target key is an attribute of the ADP or, for a joint target, attributes joined by ``*``
(``parity*magnitude``: K_parity * K_magnitude fractions, first attribute slowest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.guidance.settings import GuidanceSettings


def joint_attributes(key: str) -> list[str]:
    """'parity*magnitude' -> ['parity', 'magnitude']; a plain attribute -> [attribute]."""
    return key.split("*")


def joint_classes(key: str, adp_attrs: dict[str, list[str]]) -> list[str]:
    """Class names of a target key: an attribute's, or for 'a*b' the product 'a0/b0', 'a0/b1', ..."""
    names = [[]]
    for a in joint_attributes(key):
        names = [n + [c] for n in names for c in adp_attrs[a]]
    return ["/".join(n) for n in names]


def parse_target_spec(spec: str) -> dict[str, str]:
    """'parity=0.5,magnitude=uniform' -> {attribute: raw value}; a key given twice is an error."""
    pairs: dict[str, str] = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--target {spec!r}: expected attr=value pairs, e.g. parity=0.5")
        a, v = (s.strip() for s in part.split("=", 1))
        if not a:
            raise ValueError(f"--target {spec!r}: an attribute name is missing before '=', e.g. parity=0.5")
        if a in pairs:
            raise ValueError(f"--target {spec!r} names {a!r} twice; give each attribute once")
        pairs[a] = v
    return pairs


def attribute_list_targets(switches: str, male: float | None, mode: str,
                           adp_attrs: dict[str, list[str]]) -> dict[str, str]:
    """The original's flags: --attribute_list 0,1,0 (one switch per ADP attribute) + --male.

    Distribution mode: --male is the fraction of class 1 of every selected attribute. Sample
    mode: --male is one index over the selected attributes' joint classes, first attribute
    slowest, as the original decodes it: with two binary attributes 0, 1, 2, 3 are the class
    pairs (0, 0), (0, 1), (1, 0), (1, 1); with one attribute it is that attribute's class."""
    sw = [s.strip() for s in switches.split(",")]
    names = list(adp_attrs)
    if any(s not in ("0", "1") for s in sw) or "1" in sw[len(names):]:
        raise ValueError(f"--attribute_list {switches!r}: one 0/1 switch per ADP attribute, in order {names}")
    if male is None:
        raise ValueError("--attribute_list needs --male (class index, or fraction of class 1)")
    chosen = [names[i] for i, s in enumerate(sw) if s == "1" and i < len(names)]
    if mode != "sample":
        return {a: str(male) for a in chosen}
    sizes = [len(adp_attrs[a]) for a in chosen]
    n_joint = math.prod(sizes)
    if float(male) != int(male) or not 0 <= int(male) < n_joint:
        pairs = " x ".join(f"{a} {adp_attrs[a]}" for a in chosen)
        raise ValueError(f"--male {male} in sample mode must be a class index 0..{n_joint - 1} over the "
                         f"selected attributes' joint classes ({pairs}; first attribute slowest)")
    out, rest = {}, int(male)
    for a, k in zip(reversed(chosen), reversed(sizes)):
        rest, c = divmod(rest, k)
        out[a] = str(c)
    return {a: out[a] for a in chosen}


def check_target_keys(pairs: dict[str, str], adp_attrs: dict[str, list[str]]) -> None:
    """The target keys name attributes of the ADP, a joint key each attribute once."""
    for key in pairs:
        parts = joint_attributes(key)
        twice = sorted({a for a in parts if parts.count(a) > 1})
        if twice:
            raise ValueError(f"target key {key!r} names {twice} twice; a joint target joins different "
                             f"attributes, e.g. parity*magnitude")
    unknown = [a for k in pairs for a in joint_attributes(k) if a not in adp_attrs]
    if unknown:
        raise ValueError(f"the ADP has no attribute {unknown}; it has {list(adp_attrs)}")
    if not pairs:
        raise ValueError("no attribute selected for guidance")


def parse_fraction_vector(attr: str, value: str, classes: list[str]) -> torch.Tensor:
    """Target fractions for one key: 'uniform', 'p' (binary: class 1) or 'p0:p1:...'."""
    k = len(classes)
    if value == "uniform":
        return torch.full((k,), 1.0 / k)
    try:
        parts = [float(v) for v in value.replace("/", ":").split(":")]
    except ValueError:
        raise ValueError(f"target for {attr}: {value!r} is not a number or a list p0:p1:...") from None
    if not all(math.isfinite(p) for p in parts):
        raise ValueError(f"target for {attr}: fractions must be finite numbers, got {value!r}")
    if len(parts) == 1 and k == 2:
        if not 0 <= parts[0] <= 1:
            raise ValueError(f"target for {attr}: {value} is the fraction of class 1 ({classes[1]}) and must "
                             f"be in [0, 1]")
        parts = [1 - parts[0], parts[0]]
    if len(parts) != k:
        raise ValueError(f"target for {attr} has {len(parts)} fractions but the attribute has {k} "
                         f"classes {classes}: give {k} values separated by ':'")
    vec = torch.tensor(parts, dtype=torch.float32)
    if (vec < 0).any():
        raise ValueError(f"target for {attr}: fractions must be >= 0, got {parts}")
    if abs(float(vec.sum()) - 1) > 1e-4:
        raise ValueError(f"target for {attr}: fractions must sum to 1, got {parts} (sum {float(vec.sum()):.4f})")
    if (vec == 0).any():
        vec = (vec + 1e-3) / (vec + 1e-3).sum()      # chi-square needs p_ref > 0
    return vec


def sample_class_index(attr: str, value: str, classes: list[str]) -> int:
    """A class name or index -> the class index."""
    if value in classes:
        return classes.index(value)
    try:
        c = float(value)
    except ValueError:
        raise ValueError(f"sample target for {attr}: {value!r} is neither a class {classes} nor an index") from None
    if not c.is_integer() or not 0 <= c < len(classes):
        raise ValueError(f"sample target for {attr}: class index {value} out of range for {classes}")
    return int(c)


def parse_scales(spec: str | None, keys: list[str], defaults: dict[str, float]) -> dict[str, float]:
    """--scale: '2' -> every key; '1500,700' -> one per key in order (the original's: its first
    value for the first attribute, the second for the second); 'parity=2,digit=1' -> per key by
    name; unset -> ``defaults``."""
    out = dict(defaults)
    if spec is None:
        return out
    named, plain = {}, []
    for part in str(spec).split(","):
        name, _, val = (s.strip() for s in part.rpartition("="))
        try:
            x = float(val)
        except ValueError:
            raise ValueError(f"--scale {spec!r}: {val!r} is not a number") from None
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"--scale {spec!r}: each scale must be a finite number >= 0")
        if name:
            if name not in out:
                raise ValueError(f"--scale names attribute {name!r}, which is not guided ({keys})")
            named[name] = x
        else:
            plain.append(x)
    if plain and named:
        raise ValueError(f"--scale {spec!r}: give plain numbers (one, or one per attribute in order) "
                         f"or attr=value pairs, not both")
    if len(plain) == 1:
        named = dict.fromkeys(keys, plain[0])
    elif plain:
        if len(plain) != len(keys):
            raise ValueError(f"--scale {spec!r}: {len(plain)} values for {len(keys)} guided attribute(s) "
                             f"{keys}: give one value for all, or one per attribute in that order")
        named = dict(zip(keys, plain))
    out.update(named)
    return out


def refine_targets(targets: dict[str, torch.Tensor], refine: dict, attributes: dict[str, list[str]],
                   priors: dict[str, list[float]] | None = None, preserve: bool = False,
                   even: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Targets on coarse attributes -> the same targets on a finer head that nests them (ours).

    ``refine``: {coarse attribute: {"via": finer attribute, "groups": [[finer class indices of
    coarse class 0], [... of class 1], ...]}} (the config's ``refine:``), e.g. parity via digit
    with groups [[0,2,4,6,8], [1,3,5,7,9]]. Every key (plain or joint) whose attributes all
    refine via the same head is replaced by one target on that head: finer class j gets
    prod_k p_k[cell_k(j)] / n(j), the product of the keys' target shares of the cells j lies
    in, spread evenly over the n(j) finer classes of its combined cell (or, with ``priors``
    {finer head: the model's class fractions}, in proportion to them within the cell, which keeps
    the model's own mix of finer classes inside each coarse class). The judge's coarse
    fractions are then the target's, while the guide pulls each moved sample to a finer class
    instead of along one coarse direction, which keeps the mix within each coarse class.
    With ``preserve`` (and ``priors``), the coarse attributes of ``refine`` through the same head
    that no key names also keep the model's marginals (``_preserve_marginals``): a parity target
    for "a large digit" does not bring in small even digits. With ``even`` as well, each cell of
    every coarse attribute of the head (targeted and kept: "large and even") is shared evenly by
    its finer classes (6 and 8 alike) instead of in the model's proportions.
    Returns (new targets, {finer head: coarse keys}); keys that cannot be refined are kept.
    """
    by_via: dict[str, list[str]] = {}
    for key in targets:
        vias = {refine.get(a, {}).get("via") for a in joint_attributes(key)}
        if len(vias) == 1 and None not in vias:
            via = vias.pop()
            if via in attributes and via not in targets:
                by_via.setdefault(via, []).append(key)
    out = {k: v for k, v in targets.items() if not any(k in ks for ks in by_via.values())}
    for via, keys in by_via.items():
        prior = (priors or {}).get(via)
        out[via] = _finer_target(via, keys, targets, refine, len(attributes[via]), None if even else prior)
        named = {a for k in keys for a in joint_attributes(k)}
        kept = [a for a, r in refine.items() if r.get("via") == via and a not in named and a not in targets]
        if preserve and prior is not None and kept:
            out[via] = _preserve_marginals(out[via], prior, [[refine[a]["groups"] for a in joint_attributes(k)]
                                                            for k in keys], [refine[a]["groups"] for a in kept],
                                           even=even)
    return out, by_via


def _preserve_marginals(want: torch.Tensor, prior: list[float], target_groups: list[list[list[list[int]]]],
                        kept_groups: list[list[list[int]]], iters: int = 500, even: bool = False) -> torch.Tensor:
    """Iterative proportional fitting on the finer classes: keep ``want``'s mass on every cell of
    the targeted keys (cells: the joint groups of each key's attributes) and give each group of
    the untargeted attributes its ``prior`` mass; starts from ``want`` (the model's proportions
    within the targeted cells), so the result is the closest (KL) to them that meets both. With
    ``even`` it starts from equal masses: the result is then constant on each cell of the
    targeted and kept groups together (a product of one factor per group)."""
    n = len(want)
    q = want.double().clone()
    p = torch.tensor(prior, dtype=torch.float64)
    partitions = []                   # (finer-class index lists, the mass each must hold)
    for groups in target_groups:      # a key's cells: joint group membership
        cells: dict[tuple, list[int]] = {}
        for j in range(n):
            c = tuple(next((i for i, g in enumerate(gs) if j in g), None) for gs in groups)
            if None not in c:
                cells.setdefault(c, []).append(j)
        partitions.append([(idx, float(q[idx].sum())) for idx in cells.values()])
    if even:
        q = torch.ones_like(q)
    total = float(p.sum())
    for groups in kept_groups:
        partitions.append([(list(g), float(p[list(g)].sum()) / total) for g in groups])
    for _ in range(iters):
        for part in partitions:
            for idx, mass in part:
                s = float(q[idx].sum())
                if s > 0:
                    q[idx] *= mass / s
    return (q / q.sum()).float()


def quota_cells(via: str, attrs: list[str], refine: dict, n_fine: int) -> list[list[int]]:
    """The finer head's classes [0, n_fine) grouped by their cells of the coarse ``attrs`` (each
    refining via ``via``): two classes share a cell when every attribute puts them in the same
    group (parity and magnitude via digit: [[0, 2, 4], [1, 3], [6, 8], [5, 7, 9]]); a class in
    none of an attribute's groups is a cell of its own."""
    cells: dict[tuple, list[int]] = {}
    for j in range(n_fine):
        cell = tuple(next((i for i, g in enumerate(refine[a]["groups"]) if j in g), None) for a in attrs)
        cells.setdefault(cell if None not in cell else ("alone", j), []).append(j)
    return list(cells.values())


def _finer_target(via: str, keys: list[str], targets: dict[str, torch.Tensor], refine: dict,
                  n_fine: int, prior: list[float] | None = None) -> torch.Tensor:
    """The target on the finer head ``via`` equivalent to the coarse ``keys`` (refine_targets)."""
    def cell(a: str, j: int) -> int | None:
        return next((c for c, g in enumerate(refine[a]["groups"]) if j in g), None)
    want = torch.zeros(n_fine, dtype=torch.float64)
    combined: list[tuple | None] = []
    for j in range(n_fine):
        idx = [[cell(a, j) for a in joint_attributes(key)] for key in keys]
        if any(None in i for i in idx):
            combined.append(None)               # j lies in no group: never a target
            continue
        combined.append(tuple(tuple(i) for i in idx))
        share = 1.0
        for key, cells in zip(keys, idx):
            flat = 0
            for a, c in zip(joint_attributes(key), cells):
                flat = flat * len(refine[a]["groups"]) + c
            share *= float(targets[key][flat])
        want[j] = share
    weight = [1.0] * n_fine if prior is None else [float(p) for p in prior]
    for j in range(n_fine):
        if want[j] > 0:
            same = [i for i in range(n_fine) if combined[i] == combined[j]]
            mass = sum(weight[i] for i in same)
            want[j] *= weight[j] / mass if mass > 0 else 1.0 / len(same)
    if abs(float(want.sum()) - 1.0) > 1e-6:
        raise ValueError(f"cannot guide {keys} through '{via}': some class with a positive target "
                         f"has no finer class in the config's refine groups; fix the groups or "
                         f"pass --no-refine")
    return want.float()


@dataclass
class GuidancePlan:
    """A run's resolved guidance: what the Guide pursues and with which scale and cap.

    ``targets``: {key: [K] fractions} (distribution) or {attr: [K] one-hot} (sample), the keys
    the guide actually pursues (after refine); ``requested``: the user's targets as given;
    ``classes``: sample mode, the requested class index per attribute; ``estimator``: soft or
    quota (auto resolved); ``refined``: {finer head: the coarse keys it pursues} or None;
    ``cells``: {finer head: its classes grouped by the cells of the coarse attributes it pursues
    (an attribute it only keeps, under ``preserve``, makes no cells)}, for a quota that counts
    cells (``quota_level: cells`` or ``nested``).
    """
    mode: str
    settings: GuidanceSettings
    targets: dict[str, torch.Tensor]
    requested: dict[str, list[float]]
    scales: dict[str, float]
    estimator: str
    cap: float | None
    classes: dict[str, int] | None = None
    refined: dict[str, list[str]] | None = None
    cells: dict[str, list[list[int]]] | None = None

    def needs_labeller(self) -> bool:
        """Whether the finished-image check has anything to do (a running balance to count, or
        sample guidance to redraw)."""
        s = self.settings
        return s.check and (self.mode == "sample" or (s.running_balance and s.count != "assigned"))

    def to_dict(self) -> dict:
        """Plain values for run.json: the settings and what they resolved to."""
        return {"mode": self.mode, "settings": self.settings.to_dict(), "requested": self.requested,
                "guided_targets": {k: [round(float(x), 6) for x in v] for k, v in self.targets.items()},
                "scales": self.scales, "estimator": self.estimator, "cap": self.cap,
                "classes": self.classes, "guided_through": self.refined, "quota_cells": self.cells}


def plan_guidance(settings: GuidanceSettings, mode: str, raw: dict[str, str],
                  attributes: dict[str, list[str]], refine_map: dict | None = None,
                  scale_spec: str | None = None, priors: dict[str, list[float]] | None = None) -> GuidancePlan:
    """The plan for raw target strings {key: value} on an ADP with ``attributes``.

    :param refine_map: the config's ``refine:`` map (used when ``settings.refine``).
    :param scale_spec: --scale: one number, or per key (parity=2,magnitude=1).
    :param priors: the ADP's class fractions {attribute: [K]} (``refine_within: model``).
    """
    check_target_keys(raw, attributes)
    if mode == "sample":
        joint = [k for k in raw if "*" in k]
        if joint:
            raise ValueError(f"joint targets ({joint}) need --mode distribution; sample guidance "
                             f"takes one class per attribute, e.g. parity=odd,magnitude=low")
        classes = {a: sample_class_index(a, v, attributes[a]) for a, v in raw.items()}
        onehot = {a: torch.eye(len(attributes[a]))[c] for a, c in classes.items()}
        scales = parse_scales(scale_spec, list(raw), {a: settings.sample_scale for a in raw})
        return GuidancePlan(mode, settings, onehot, {a: v.tolist() for a, v in onehot.items()},
                            scales, "sample", settings.cap(False, mode), classes)
    if mode != "distribution":
        raise ValueError(f"guidance mode must be 'distribution' or 'sample', got {mode!r}")
    requested = {k: parse_fraction_vector(k, v, joint_classes(k, attributes)) for k, v in raw.items()}
    guided, refined = requested, None
    if settings.refine and refine_map:
        within = None
        if settings.refine_within in ("model", "preserve", "preserve_even"):
            vias = {refine_map[a]["via"] for k in requested for a in joint_attributes(k) if a in refine_map}
            missing = sorted(v for v in vias if not (priors or {}).get(v))
            if missing:
                raise ValueError(f"refine_within: model needs the model's class fractions of {missing} in the "
                                 f"ADP; add them (python multi_classifier.py --priors_from_samples 1000 "
                                 f"--adp ADP.pt --out NEW.pt) or use refine_within: uniform")
            within = priors
        guided, refined = refine_targets(requested, refine_map, attributes, within,
                                         preserve=settings.refine_within.startswith("preserve"),
                                         even=settings.refine_within == "preserve_even")
    estimator = settings.estimator
    if estimator == "auto":        # quota for one plain target, soft for several or a joint one
        estimator = "quota" if len(guided) == 1 and not any("*" in k for k in guided) else "soft"
    soft = estimator == "soft"
    cells = None
    if estimator == "quota" and settings.quota_level in ("cells", "nested") and refined:
        # cells of the targeted attributes only: a kept attribute's mix rides on the finer classes
        # within each cell (nested: their shares; cells: each sample's own), not on the cells' counts
        cells = {}
        for via, keys in refined.items():
            named = list(dict.fromkeys(a for k in keys for a in joint_attributes(k)))
            cells[via] = quota_cells(via, named, refine_map, len(attributes[via]))
    if soft and settings.count == "assigned" and settings.running_balance:
        raise ValueError("guidance setting count: assigned counts the quota's classes, but these targets "
                         f"({', '.join(guided)}) use the soft estimator, which assigns none; set "
                         "estimator: quota (one plain target), or count: class")
    scales = parse_scales(scale_spec, list(raw),
                          {k: settings.scale_for(i, soft, mode) for i, k in enumerate(raw)})
    for via, keys in (refined or {}).items():      # a finer head takes the scale of its first key
        scales[via] = scales[keys[0]]
        for k in keys:
            scales.pop(k)
    return GuidancePlan(mode, settings, guided,
                        {k: [round(float(x), 6) for x in v] for k, v in requested.items()},
                        scales, estimator, settings.cap(soft, mode), None, refined or None, cells)
