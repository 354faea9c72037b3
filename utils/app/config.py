"""YAML presets plus command-line overrides. Configs are read, never mutated in place."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from models.loader import REPO_ROOT, resolve_path
from utils.config import RunConfig

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
    """Raise the ValueError of ``RunConfig.of`` for a config that is not well formed."""
    RunConfig.of(cfg, path)


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
