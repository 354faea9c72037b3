"""YAML presets plus command-line overrides. Configs are read, never mutated in place."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from models.loader import REPO_ROOT, resolve_path
from models.t2i import FAMILIES, is_text_to_image

DEFAULT_CONFIG = "configs/digits16.yml"


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    """Read a YAML config; a missing file names the configs that exist."""
    p = resolve_path(path)
    if not p.exists():
        known = sorted(str(c.relative_to(REPO_ROOT)) for c in (REPO_ROOT / "configs").glob("*.yml"))
        raise FileNotFoundError(f"config {path} not found; available: {known}")
    if p.is_dir():
        raise ValueError(f"config {path} is a folder; give a YAML file (e.g. configs/digits16.yml)")
    try:
        with open(p) as fh:
            cfg = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {p} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {p} must be a YAML mapping (model:, diffusion:, ...), got {type(cfg).__name__}")
    cfg.setdefault("name", p.stem)
    check_config(cfg, p)
    return cfg


def check_config(cfg: dict[str, Any], path: str | Path) -> None:
    """The sections every command reads, checked once when the config is read: ``model:`` (with
    its family), ``diffusion:`` for the unconditional families, and ``sampling:``'s values.
    A problem is a ValueError naming the file, the key and what it should be."""
    where = f"config {path}"
    for section in ("model", "diffusion", "sampling", "guidance", "demo", "refine"):
        if section in cfg and not isinstance(cfg[section], dict):
            raise ValueError(f"{where}: {section}: must be a mapping (key: value lines), got "
                             f"{type(cfg[section]).__name__} {cfg[section]!r:.60}")
    model = cfg.get("model")
    if not model:
        raise ValueError(f"{where} has no model: section; it needs at least model: {{family: ..., "
                         f"checkpoint: ...}} (see configs/digits16.yml)")
    if not model.get("family"):
        raise ValueError(f"{where}: model.family is not set; one of adm, ddpm, diffusers (unconditional "
                         f"U-Nets) or {', '.join(FAMILIES)} (text-to-image)")
    if not is_text_to_image(model["family"]) and "diffusion" not in cfg:
        raise ValueError(f"{where} has no diffusion: section (beta_schedule, beta_start, beta_end, "
                         f"num_diffusion_timesteps) for its {model['family']} model")
    sampling = cfg.get("sampling") or {}
    checks = {"steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        "an integer >= 1 (DDIM steps)"),
              "eta": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1] (0 deterministic, 1 the original's)"),
              "cfg": (lambda v: _number(v) and v >= 1, "a number >= 1 (classifier-free guidance scale; 1: none)"),
              "skip_type": (lambda v: v in ("uniform", "original", "leading"), "one of uniform, original, leading")}
    for key, (ok, what) in checks.items():
        if key in sampling and not ok(sampling[key]):
            raise ValueError(f"{where}: sampling.{key} is {sampling[key]!r}; it must be {what}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def with_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of cfg with dotted keys set, e.g. {"model.checkpoint": "x.pt"}; None is skipped."""
    out = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out
