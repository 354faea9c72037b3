"""The run configuration: a config mapping (YAML, with the command line's overrides) typed and
checked in one place, with every sampling default (``RunConfig.of``). Read by every command and
loader; ``utils.app.config.load_config`` reads the file."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.t2i import FAMILIES, is_text_to_image

#: images per run when neither --n_test_img nor the config's demo: n says
DEFAULT_N_IMAGES = 100


@dataclass(frozen=True)
class Sampling:
    """``sampling:``, every default in one place."""
    steps: int = 50                 # DDIM steps (text-to-image: the pipeline's inference steps)
    eta: float | None = None        # None: 1.0 for the unconditional DDIM sampler (the original's), 0.0 for text-to-image
    cfg: float = 7.5                # classifier-free guidance scale (text-to-image)
    skip_type: str = "uniform"      # the unconditional sampler's timestep grid

    def eta_for(self, text_to_image: bool) -> float:
        return float(self.eta) if self.eta is not None else (0.0 if text_to_image else 1.0)


@dataclass(frozen=True)
class Demo:
    """``demo:`` (main.py --demo): the target, the images per run, the prompts (text-to-image)."""
    target: str | None = None
    n: int = DEFAULT_N_IMAGES
    prompts: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunConfig:
    """A run config, typed and checked (``RunConfig.of``): what every command reads from a config.
    ``model`` and ``diffusion`` go whole to the model loaders (``models.loader``,
    ``utils.sampling.text2image.load_t2i``), ``guidance`` to ``utils.guidance.settings``, which
    check their own keys; ``prompts``, ``unconditional``, ``tint`` and ``train`` are the training
    sections of the digits text-to-image configs (``scripts/train_digits_t2i.py``)."""
    model: dict
    name: str | None = None                 # the file's stem unless the config says
    sampling: Sampling = Sampling()
    diffusion: dict | None = None
    guidance: dict | None = None
    refine: dict | None = None
    demo: Demo = Demo()
    adp: str | None = None                  # the ADP (a .pt file, a folder or a cached hub id)
    judge: str | dict | None = None         # the evaluation's judge (never the labeller)
    labeller: str | dict | None = None      # pseudo-labels and the finished-image check
    reference: str | None = None            # the held-out real set for the Frechet distance
    prompt: str | None = None               # the default prompt (text-to-image)
    negative_prompt: str | None = None
    pixel_classifier: str | None = None     # the pixel-space baseline's classifier
    source: str | None = None               # where the checkpoint comes from (for people)
    prompts: dict | None = None
    unconditional: str | None = None
    tint: float = 0.0
    train: dict | None = None

    @property
    def family(self) -> str | None:
        return self.model.get("family")

    @property
    def text_to_image(self) -> bool:
        return is_text_to_image(self.family)

    @property
    def eta(self) -> float:
        """The DDIM eta of this config's sampler (``Sampling.eta_for``)."""
        return self.sampling.eta_for(self.text_to_image)

    @classmethod
    def of(cls, cfg: dict[str, Any], path: str | Path | None = None, require_model: bool = True) -> "RunConfig":
        """The typed view of a config mapping (YAML with overrides), checked: unknown keys, the
        sections every command reads (``model:`` with its family, ``diffusion:`` for the
        unconditional families, ``sampling:``, ``demo:``) and each value's type. A problem is a
        ValueError naming the file, the key and what it should be. ``require_model=False``: a part of a
        config without its model (the guidance settings of ``utils.guidance.build_plan``)."""
        cfg = dict(cfg)
        where = f"config {path or cfg.get('name') or '<config>'}"
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a config holds {known}")
        for section in ("model", "diffusion", "sampling", "guidance", "demo", "refine", "train", "prompts"):
            if cfg.get(section) is not None and not isinstance(cfg[section], dict):
                raise ValueError(f"{where}: {section}: must be a mapping (key: value lines), got "
                                 f"{type(cfg[section]).__name__} {cfg[section]!r:.60}")
        model = cfg.get("model")
        if not model and not require_model:
            model = cfg["model"] = {}
        elif not model:
            raise ValueError(f"{where} has no model: section; it needs at least model: {{family: ..., "
                             f"checkpoint: ...}} (see configs/digits16.yml)")
        if require_model and not model.get("family"):
            raise ValueError(f"{where}: model.family is not set; one of adm, ddpm, diffusers (unconditional "
                             f"U-Nets) or {', '.join(FAMILIES)} (text-to-image)")
        if require_model and not is_text_to_image(model["family"]) and "diffusion" not in cfg:
            raise ValueError(f"{where} has no diffusion: section (beta_schedule, beta_start, beta_end, "
                             f"num_diffusion_timesteps) for its {model['family']} model")
        values = {k: cfg[k] for k in known if cfg.get(k) is not None}
        for key in ("adp", "reference", "prompt", "negative_prompt", "pixel_classifier", "source", "unconditional"):
            if key in values and not isinstance(values[key], str):
                raise ValueError(f"{where}: {key} is {values[key]!r}; it must be a string")
        if "judge" in values and not isinstance(values["judge"], (str, dict)):
            raise ValueError(f"{where}: judge is {values['judge']!r}; it must be a name, a file or a mapping")
        lab = values.get("labeller")
        if lab is not None and not (isinstance(lab, (str, dict)) or (
                isinstance(lab, list) and len(lab) > 1 and all(isinstance(v, (str, dict)) for v in lab))):
            raise ValueError(f"{where}: labeller is {lab!r}; it must be a name, a file, a mapping or a list "
                             f"of two or more of them (their probabilities averaged)")
        if "tint" in values and not _number(values["tint"]):
            raise ValueError(f"{where}: tint is {values['tint']!r}; it must be a number")
        values["sampling"] = _section(Sampling, cfg.get("sampling") or {}, f"{where}: sampling", SAMPLING_CHECKS)
        values["demo"] = _section(Demo, cfg.get("demo") or {}, f"{where}: demo", DEMO_CHECKS)
        if values["demo"].prompts is not None:
            values["demo"] = dataclasses.replace(values["demo"], prompts=tuple(values["demo"].prompts))
        return cls(**values)


def _int(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


#: each key's check and what it must be
SAMPLING_CHECKS = {
    "steps": (_int(1), "an integer >= 1 (DDIM steps)"),
    "eta": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1] (0 deterministic, 1 the original's)"),
    "cfg": (lambda v: _number(v) and v >= 1, "a number >= 1 (classifier-free guidance scale; 1: none)"),
    "skip_type": (lambda v: v in ("uniform", "original", "leading"), "one of uniform, original, leading")}
DEMO_CHECKS = {
    "target": (lambda v: isinstance(v, str) and v, "a target such as parity=0.5"),
    "n": (_int(1), "an integer >= 1 (images per run)"),
    "prompts": (lambda v: isinstance(v, list) and v and all(isinstance(q, str) for q in v), "a list of prompts")}


def _section(kind, values: dict, where: str, checks: dict):
    """A section's dataclass from its mapping: unknown keys and bad values named."""
    unknown = sorted(set(values) - set(checks))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; it holds {sorted(checks)}")
    for key, value in values.items():
        ok, what = checks[key]
        if value is not None and not ok(value):
            raise ValueError(f"{where}.{key} is {value!r}; it must be {what}")
    return kind(**{k: v for k, v in values.items() if v is not None})


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
