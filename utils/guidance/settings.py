"""Guidance settings: one typed, validated object, built in one place from a config's
``guidance:`` section and command-line overrides, starting from a named preset.

Presets are complete value sets (every field below), not overrides of each other:

- ``paper``: the original code, literally (Parihar et al. 2024, its ``multi_classifier.py`` /
  ``h_classification.py`` and the guided-diffusion U-Net's update):
  q = softmax(logits / 8); distribution loss L = sum_a s_a sum_k (p_hat_k - p_k)^2 / p_k with
  p_hat the batch mean of q; sample loss L = -sum_i s q_i[c_i];
  h <- h - 1.5 * beta_t^0.05 * grad_h(300 * L), i.e. ``step_factor`` 450 on the plain gradient;
  no cap, no debias, no running balance, no refine, no finished-image check; scales 1500 (one
  attribute), [1500, 700] (two), 15 (sample); every step guided but the first (t = 999).
  The original samples with eta = 1: so do the configs of this project (``sampling.eta``).
- ``ours``: this project's method (measured in docs/RESULTS.md): the covariance-preconditioned
  step normalised by batch size and capped per sample, q at temperature 1 debiased with the
  ADP's confusion matrices, the quota estimator for one target (soft for several), a running
  balance over the run counted on the finished images by the config's labeller, coarse targets
  pursued through a finer head (the config's ``refine`` map), sample guidance with redraws.

A config without a ``guidance:`` section uses ``paper``. main.py's guidance-settings flags are made
from ``CLI_FIELDS`` (``add_guidance_flags``; ``overrides_from_args`` reads them back).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from models.t2i import is_text_to_image


class SettingsError(ValueError):
    """A guidance setting is unknown, of the wrong type or out of range."""


#: field -> allowed values, for the enumerated settings
CHOICES = {"estimator": ("soft", "quota", "auto"), "direction": ("gradient", "covariance", "batch"),
           "sample_loss": ("prob", "xent", "logit"), "refine_within": ("uniform", "model", "preserve", "preserve_even"),
           "loss": ("chi_square", "kl"), "cfg_estimate": ("cond", "both"), "cfg_edit": ("both", "cond"),
           "head_rule": ("exact", "nearest"), "count": ("class", "probability", "assigned"),
           "quota_level": ("finer", "cells", "nested")}


@dataclass(frozen=True)
class GuidanceSettings:
    """Every knob of h-space guidance (docstrings of the fields: the comments)."""
    preset: str
    estimator: str                    # distribution: soft (paper: batch mean of q) | quota (ours) | auto
    temperature: float                # q = softmax(logits / temperature)
    direction: str                    # gradient (paper: grad_h L) | covariance (ours: Cov_s(h) W_s^T, Cov
                                      # of the ADP's training h) | batch (Cov of the run's own h at step s)
    step_factor: float                # the step's constant: paper 1.5 * 300 = 450
    beta_power: float                 # lambda_t = step_factor * beta_t ** beta_power
    batch_normalise: bool             # multiply the distribution step by N (p_hat is a mean over N)
    distribution_scale: tuple         # s per target in order (the last repeats), e.g. (1500, 700)
    sample_scale: float               # s of sample guidance
    max_step: float | None            # per-sample cap on ||delta h|| in units of ||std_t(h)||; None: none
    sample_max_step: float | None     # the same for sample guidance
    soft_distribution_scale: tuple | None   # used instead of distribution_scale by the soft
    soft_max_step: float | None             # estimator, and cap; None: the same as the general ones
    sample_loss: str                  # prob (paper: -q_c) | xent (ours: -log q_c) | logit (the original SD
                                      # code: -logit_c, the raw logit, no softmax or temperature)
    first_step: int                   # guided step indices i in [first_step, last_step)
    last_step: int | None
    debias: bool                      # estimate p as M_s^-1 p_hat (the ADP's confusion matrices)
    running_balance: bool             # the estimate includes the run's earlier batches
    refine: bool                      # pursue coarse targets through a finer head (config refine:)
    refine_within: str                # uniform: each coarse class's share spread evenly over its finer
                                      # classes | model: in the model's own proportions (the ADP's class_prior)
                                      # | preserve: as model, and the coarse attributes nobody targeted
                                      # (same finer head) keep the model's marginals (iterative fitting)
                                      # | preserve_even: as preserve, each cell of the coarse attributes
                                      # (large and even) shared evenly by its finer classes (6 and 8)
    check: bool                       # the config's labeller checks finished images
    count: str                        # the check's running balance counts each image's labeller class
                                      # (class: its argmax) or its labeller probabilities (probability:
                                      # the expected count, an ambiguous image half in each class);
                                      # assigned: the quota's classes at the batch's last guided step (what
                                      # it asked for; the labeller is not read: only the rounding of the
                                      # quota's counts is carried from batch to batch)
    quota_level: str                  # refine with the quota estimator: the quota's counts are of the finer
                                      # classes (finer: each sample pulled to one digit in the target's
                                      # digit counts) or of the coarse attributes' cells (cells: "large and
                                      # even" counted as one, each sample pulled to the finer class of its
                                      # cell that it is closest to, weighted by the target's mix in the cell;
                                      # nested: the cells counted over the run as the running balance
                                      # counts them, each cell's slots then shared among its finer classes in
                                      # the target's mix, counted on what the quota asked for before)
    sample_retries: int               # sample guidance with check: rounds of redrawing misses
    retry_boost: float                # ... each round with the step cap times this
    loss: str                         # distribution loss of the soft estimator: chi_square (paper,
                                      # CelebA-HQ code) | kl: KL(p_hat || p) (paper, Stable Diffusion code)
    cfg_estimate: str                 # classifier-free guidance: the batch estimate from the conditional
                                      # rows (cond, ours) or from both halves (both, the original SD code)
    cfg_edit: str                     # ... and the edit on both halves (the same delta h for an image's
                                      # two rows) or on the conditional half only
    head_rule: str                    # a step whose timestep has no head: an error (exact) or the head of
                                      # the nearest trained timestep within one grid spacing (nearest)
    cap_growth: float | None          # the cap at timestep t times min(abar_t^-1/2, cap_growth) (v-prediction
                                      # models: an edit of h moves their clean-image estimate sqrt(abar_t)
                                      # times as far as an eps-model's); None: the same cap at every step
    batch_min: int                    # direction batch: the ADP's stored directions until the run's h at a
                                      # step number this many (2: from the first batch of two)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for run.json."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def scale_for(self, index: int, soft: bool, mode: str) -> float:
        """Scale of the index-th guided target (sample mode: the sample scale)."""
        if mode == "sample":
            return self.sample_scale
        scales = self.soft_distribution_scale if soft and self.soft_distribution_scale else self.distribution_scale
        return float(scales[min(index, len(scales) - 1)])

    def cap(self, soft: bool, mode: str) -> float | None:
        """The per-sample step cap (units of ||std_t(h)||) or None."""
        if mode == "sample":
            return self.sample_max_step
        return self.soft_max_step if soft and self.soft_max_step is not None else self.max_step


PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(estimator="soft", temperature=8.0, direction="gradient", step_factor=450.0,
                  beta_power=0.05, batch_normalise=False, distribution_scale=(1500.0, 700.0),
                  sample_scale=15.0, max_step=None, sample_max_step=None,
                  soft_distribution_scale=None, soft_max_step=None, sample_loss="prob",
                  first_step=1, last_step=None, debias=False, running_balance=False,
                  refine=False, refine_within="uniform", check=False, sample_retries=0, retry_boost=1.0,
                  loss="chi_square", cfg_estimate="both", cfg_edit="both", head_rule="exact",
                  cap_growth=None, batch_min=2, count="class",
                  quota_level="finer"),
    "ours": dict(estimator="auto", temperature=1.0, direction="covariance", step_factor=1.0,
                 beta_power=0.05, batch_normalise=True, distribution_scale=(1000.0,),
                 sample_scale=1000.0, max_step=2.0, sample_max_step=3.0,
                 soft_distribution_scale=(128.0,), soft_max_step=1.0, sample_loss="xent",
                 first_step=1, last_step=None, debias=True, running_balance=True,
                 refine=True, refine_within="model", check=True, sample_retries=2, retry_boost=2.0,
                 loss="chi_square", cfg_estimate="cond", cfg_edit="both", head_rule="exact",
                 cap_growth=None, batch_min=2, count="class",
                 quota_level="finer"),
}
#: presets of a model family that differ from the unconditional ones (complete value sets too).
#: ``sd``/``paper``: the original's Stable Diffusion code: q = softmax(logits / 8) averaged over
#: both halves of the classifier-free-guidance batch, L = KL(p_hat || p),
#: h <- h - 600 * grad_h(500 * L) at every step (no beta_t factor), nothing else; its sample
#: guidance takes the raw logits, L = -sum_i logit_i[c], h <- h - 600 * grad_h L, so every row
#: moves by 600 W_c (no softmax, temperature or 500 factor). It samples with the model folder's
#: own scheduler (``model.scheduler`` is not applied; an explicit --scheduler is).
FAMILY_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sd": {
        "paper": dict(estimator="soft", temperature=8.0, direction="gradient", step_factor=600.0,
                      beta_power=0.0, batch_normalise=False, distribution_scale=(500.0,),
                      sample_scale=1.0, max_step=None, sample_max_step=None,
                      soft_distribution_scale=None, soft_max_step=None, sample_loss="logit",
                      first_step=0, last_step=None, debias=False, running_balance=False,
                      refine=False, refine_within="uniform", check=False, sample_retries=0,
                      retry_boost=1.0, loss="kl", cfg_estimate="both", cfg_edit="both",
                      head_rule="nearest", cap_growth=None, batch_min=2, count="class",
                      quota_level="finer"),
        # ours, with the heads of the nearest trained timestep and every step guided (as the SD code)
        # the prompt's other coarse attributes (a large digit's magnitude) keep their marginals
        "ours": dict(PRESETS["ours"], head_rule="nearest", first_step=0, refine_within="preserve"),
    },
}
DEFAULT_PRESET = "paper"

_TYPES = {f.name: f.type for f in dataclasses.fields(GuidanceSettings) if f.name != "preset"}


def _coerce(key: str, value: Any) -> Any:
    """value as the field's type, or a SettingsError naming the key."""
    kind = _TYPES[key]

    def bad(why: str) -> SettingsError:
        return SettingsError(f"guidance setting {key}: {value!r} {why}")
    if value is None:
        if "None" in kind:
            return None
        raise bad("must be set (null is not allowed here)")
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise bad(f"is not one of {list(CHOICES[key])}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("must be an integer >= 0")
        return value
    if kind.startswith("tuple"):
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        if not vals:
            raise bad("must be a number or a non-empty list of numbers")
        return tuple(_number(key, v) for v in vals)
    return _number(key, value)


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SettingsError(f"guidance setting {key}: {v!r} must be a finite number >= 0")
    return float(v)


def presets_for(family: str | None) -> dict[str, dict[str, Any]]:
    """The presets of a model family (``model.family`` of a config): its own where it has them."""
    # every text-to-image family takes the presets of the original's SD code
    return {**PRESETS, **FAMILY_PRESETS.get("sd" if is_text_to_image(family) else family or "", {})}


def resolve_settings(section: dict | None, overrides: dict | None = None,
                     family: str | None = None) -> GuidanceSettings:
    """Settings from a config's ``guidance:`` section (``preset:`` plus any field) and
    command-line / programmatic overrides (None values are ignored), starting from the preset
    of the model ``family``. The section's fields adjust the section's own preset: an override
    naming another preset (``--preset paper``) gets that preset's values as they are. Unknown keys, wrong types and unknown enumeration values are a
    SettingsError that names them."""
    section = dict(section or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    own = section.pop("preset", None) or DEFAULT_PRESET
    preset = overrides.pop("preset", None) or own
    if preset != own:              # the section's fields adjust its own preset: another one is literal
        section = {}
    presets = presets_for(family)
    if preset not in presets:
        raise SettingsError(f"unknown guidance preset {preset!r}; presets: {sorted(presets)}")
    values = dict(presets[preset])
    for where, src in (("the config's guidance: section", section), ("the overrides", overrides)):
        unknown = sorted(set(src) - set(values))
        if unknown:
            raise SettingsError(f"unknown guidance setting(s) {unknown} in {where}; allowed: "
                                f"{['preset'] + sorted(values)}")
        values.update(src)
    values = {k: _coerce(k, v) for k, v in values.items()}
    if values["temperature"] <= 0:
        raise SettingsError("guidance setting temperature must be > 0")
    if values["debias"] and values["temperature"] != 1.0:
        raise SettingsError("guidance setting debias needs temperature 1 (the ADP's confusion "
                            "matrices are measured at temperature 1)")
    if values["cap_growth"] is not None and values["cap_growth"] < 1:
        raise SettingsError(f"guidance setting cap_growth: {values['cap_growth']} must be >= 1 (the most the "
                            "cap may grow at the noisiest steps) or null")
    if values["last_step"] is not None and values["last_step"] <= values["first_step"]:
        raise SettingsError(f"guided steps [{values['first_step']}, {values['last_step']}) are empty: "
                            f"last_step must be > first_step")
    return GuidanceSettings(preset=preset, **values)


def parse_guide_steps(spec: str) -> dict[str, int | None]:
    """'1:25' -> {first_step: 1, last_step: 25}; '10:' -> last_step None."""
    a, sep, b = spec.partition(":")
    try:
        first, last = int(a or 0), (int(b) if b else None)
    except ValueError:
        raise SettingsError(f"--guide_steps {spec!r}: expected start:end step indices, e.g. 1:25") from None
    if not sep:
        raise SettingsError(f"--guide_steps {spec!r}: expected start:end step indices, e.g. 1:25")
    return {"first_step": first, "last_step": last}


#: the settings main.py takes as flags: field -> help text. ``--NAME`` sets field NAME; the flag's
#: choices are the field's (``CHOICES``; ``preset``: the preset names), a bool field is
#: ``--NAME`` / ``--no-NAME``; not given: None (the preset's or the config's value stands)
CLI_FIELDS: dict[str, str] = {
    "preset": "guidance settings: paper (the original code's method, literally) or ours "
              "(this project's; docs/RESULTS.md); default: config guidance.preset, else paper",
    "estimator": "distribution guidance's batch estimate: quota (ours) or soft (the paper's "
                 "mean of the ADP's softmax); auto: quota for one attribute, soft for "
                 "several or a joint target; default: the preset's",
    "running_balance": "distribution guidance steers the whole run: the estimate includes the "
                       "samples of earlier batches (default: the preset's)",
    "refine": "guide a coarse target through a finer head that nests it (the config's "
              "refine: map, e.g. parity through digit; default: the preset's)",
    "refine_within": "refine spreads a coarse class's share over its finer classes evenly (uniform) "
                     "or in the model's own proportions (model: the ADP's class fractions, which "
                     "keeps what was not targeted; preserve: as model, and the coarse attributes "
                     "nobody targeted keep the model's marginals; preserve_even: as preserve, each cell of "
                     "the coarse attributes shared evenly by its finer classes; default: the preset's)",
    "check": "the config's labeller checks finished images: the running balance counts "
             "its classes, sample guidance redraws the images outside their class "
             "(default: the preset's)",
    "count": "the check's running balance counts each finished image's labeller class (class), "
             "its labeller probabilities (probability: the expected count) or the quota's classes at "
             "the last guided step (assigned: no labeller; default: the preset's)",
    "quota_level": "refine with the quota estimator: count the finer classes (finer) or the cells of "
                   "the coarse attributes they pursue (cells: each sample then goes to the finer class "
                   "of its cell it is closest to; nested: each cell's count is then shared among its "
                   "finer classes in the target's mix, counted on what the quota asked for in earlier "
                   "batches; default: the preset's)",
    "cfg_edit": "text-to-image: edit h of both halves of the CFG batch (the same delta h) or the "
                "conditional half only (default: the preset's)",
    "cfg_estimate": "text-to-image: the batch estimate from the conditional rows (ours) or from both "
                    "halves (the original SD code) (default: the preset's)",
}
#: flags that set several fields at once: flag -> (the fields it sets, the parser of its value
#: into {field: value}, help text)
COMPOSITE_FLAGS: dict[str, tuple[tuple[str, ...], Callable[[str], dict], str]] = {
    "guide_steps": (("first_step", "last_step"), parse_guide_steps,
                    "guided step indices start:end (default: the preset's, 1: = all but t = 999)"),
}
#: every guidance-settings flag's name (its ``dest``)
FLAG_NAMES: tuple[str, ...] = (*CLI_FIELDS, *COMPOSITE_FLAGS)


def _flag_kwargs(name: str) -> dict[str, Any]:
    """argparse keywords of field ``name``'s flag, from the field's type and choices."""
    kind = _TYPES[name] if name != "preset" else "str"
    choices = sorted(PRESETS) if name == "preset" else CHOICES.get(name)
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if choices is not None:
        return {"choices": list(choices)}
    raise TypeError(f"guidance setting {name} ({kind}): CLI_FIELDS holds bool and enumerated fields only")


def add_guidance_flags(group) -> None:
    """Add ``--NAME`` for every field of ``CLI_FIELDS`` and the composite flags to an argparse
    group (or parser)."""
    for name, text in CLI_FIELDS.items():
        group.add_argument(f"--{name}", help=text, **_flag_kwargs(name))
    for name, (_, _, text) in COMPOSITE_FLAGS.items():
        group.add_argument(f"--{name}", help=text)


def overrides_from_args(args) -> dict[str, Any]:
    """The parsed command line's guidance settings (None: not given), for ``resolve_settings``."""
    out = {name: getattr(args, name, None) for name in CLI_FIELDS}
    for name, (_, parse, _) in COMPOSITE_FLAGS.items():
        if getattr(args, name, None):
            out.update(parse(getattr(args, name)))
    return out
