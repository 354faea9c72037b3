"""The Python API: balance a stock diffusers pipeline you already hold, or sample an unconditional
model of a config, without the command line.

    import diffusion_latent
    guide = diffusion_latent.balance(pipe, adp="pretrained/digits16_t2i_adp.pt", target={"parity": 0.5})
    with guide:                                   # the h-space hook is on only inside the block
        images = pipe(["a digit"] * 8, height=16, width=16, generator=gens).images
    guide.report()                                # per call: images, the ADP's estimate, guided steps

    sampler = diffusion_latent.load("configs/digits16.yml")
    images = sampler.sample(range(8), target={"parity": 0.5})       # [8, C, H, W] in [-1, 1]

``balance`` leaves the pipeline and the call's arguments as they are: on entering the block the
h module gets one forward hook (``models.hspace``) and the scheduler's ``set_timesteps`` a wrapper
that marks where each call begins; both are removed on leaving it, also after an exception
(``utils.sampling.text2image.GuidedCalls``, the same attachment the command line draws through).
Each pipeline call inside the block is one batch of the guide; with the preset's running
balance, later calls make up what earlier ones left.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.adp import ADP
from models.files import resolve_path
from models.t2i import DEFAULT_POOL, FAMILIES, default_module, schedule_betas
from utils.config import RunConfig
from utils.guidance import build_guide, build_plan
from utils.guidance.guide import Guide
from utils.sampling.text2image import GuidedCalls


def family_of_pipeline(pipe) -> str:
    """The ``models.t2i`` family of a diffusers pipeline object (by its class, or a subclass)."""
    names = {c.__name__ for c in type(pipe).__mro__}
    for name, fam in FAMILIES.items():
        if fam.pipeline in names:
            return name
    raise ValueError(f"{type(pipe).__name__} is not a pipeline of a supported family: "
                     f"{', '.join(f.pipeline for f in FAMILIES.values())}")


def _targets(target) -> dict[str, str]:
    """{key: raw target}: a number (the share of class 1 of a binary attribute), a list of
    fractions, or a class name / index (sample mode)."""
    if not isinstance(target, dict) or not target:
        raise ValueError(f"target {target!r}: give a dict such as {{'gender': 0.5}} or {{'age': [0.3, 0.4, 0.3]}}")
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in target.items()}


def _config(config, family: str) -> dict:
    """The guidance-relevant part of a run config (its ``guidance:`` and ``refine:``), or the
    family's ``ours`` preset alone."""
    if config is None:
        return {"model": {"family": family}, "guidance": {"preset": "ours"}}
    from utils.app.config import load_config
    rc = RunConfig.of(config if isinstance(config, dict) else load_config(resolve_path(str(config))))
    return {"model": {"family": family}, "guidance": rc.guidance or {"preset": "ours"}, "refine": rc.refine}


def _adp(adp) -> ADP:
    return adp if isinstance(adp, ADP) else ADP.load(resolve_path(str(adp)))


class Balance:
    """h-space guidance of a diffusers pipeline while the ``with`` block is active (module
    docstring). Made by ``balance``."""

    def __init__(self, pipe, adp, target: dict, mode: str = "distribution", preset: str | None = None,
                 scale: str | float | None = None, h_module: str | None = None, h_pool: int | None | str = "adp",
                 config: str | Path | dict | None = None, prompt: str | None = None, **settings):
        self.pipe, self.family = pipe, family_of_pipeline(pipe)
        self.fam = FAMILIES[self.family]
        self.denoiser = getattr(pipe, self.fam.denoiser)
        self.adp = _adp(adp).to(self.denoiser.device)
        trained = (self.adp.meta or {}).get("model") or {}
        self.module = h_module or trained.get("h_module") or default_module(self.denoiser, self.family)
        if h_pool == "adp":
            h_pool = trained.get("h_pool", DEFAULT_POOL if self.fam.patch else None)
        self.pool = h_pool
        cfg = _config(config, self.family)
        overrides = {"check": False, **({} if cfg.get("refine") else {"refine": False}), **settings}
        if preset is not None:
            overrides["preset"] = preset
        self.plan = build_plan(cfg, mode, _targets(target), self.adp.attributes, overrides,
                               None if scale is None else str(scale), self.adp.priors(prompt))
        self.guide: Guide = build_guide(cfg, self.plan, self.adp, schedule_betas(pipe.scheduler).to(self.denoiser.device))
        self.batches: list[dict] = []
        halves = lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))   # noqa: E731
        hook = {"module": self.module, "pool": self.pool, "t_scale": self.fam.t_scale,
                "patch": self.fam.patch or 1, "halves": halves}
        self._calls = GuidedCalls(pipe, self.fam.denoiser, hook, self._start, self._finish)

    def __enter__(self) -> "Balance":
        self._calls.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._calls.__exit__(*exc)

    def _start(self, n: int):
        """A pipeline call of n images: a new batch of the guide, counted in the report."""
        self.batches.append({"images": n, "guided_steps": 0})
        return _Counted(self.guide.start(list(range(n))), self.batches[-1])

    def _finish(self, batch: "_Counted") -> None:
        """A call is over: its last estimate is recorded and it joins the running balance."""
        batch.record["estimate"] = batch.batch.after_batch(None).estimate

    def report(self) -> dict:
        """What was guided: the plan, per pipeline call its images, guided steps and the ADP's
        last-step estimate, and the running balance."""
        return {"family": self.family, "h_module": self.module, "h_pool": self.pool, "mode": self.plan.mode,
                "targets": self.plan.requested, "settings": self.plan.settings.to_dict(),
                "batches": self.batches, **self.guide.summary()}


class _Counted:
    """A batch guide that counts, in ``record``, the steps at which it changed h."""

    def __init__(self, batch, record: dict):
        self.batch, self.record = batch, record

    def edit(self, h, step):
        new = self.batch.edit(h, step)
        if new is not None and new is not h:
            self.record["guided_steps"] += 1
        return new


def balance(pipe, adp, target: dict, **kwargs) -> Balance:
    """Guidance for a stock diffusers pipeline: ``with balance(pipe, adp, target): pipe(...)``.

    :param pipe: a pipeline of a ``models.t2i`` family (StableDiffusionPipeline, ..., SanaPipeline).
    :param adp: an ADP checkpoint path (or an ``ADP``) trained on this model's h.
    :param target: {attribute: share of class 1, or a list of fractions} (distribution mode), or
        {attribute: class} with ``mode="sample"``.
    :param kwargs: ``mode``, ``preset`` (ours | paper), ``scale``, ``h_module``, ``h_pool`` (default:
        as the ADP was trained), ``config`` (a run config whose guidance and refine sections to use,
        as the command line does), ``prompt`` (the prompt whose class fractions the ADP knows, for
        refine) and any guidance setting (e.g. ``running_balance=False``). The finished-image check
        is off: the hook never sees the images.
    """
    return Balance(pipe, adp, target, **kwargs)


class Sampler:
    """An unconditional model of a config, sampled from Python (``load``)."""

    def __init__(self, cfg: dict, device: torch.device):
        from utils.sampling.pipeline import load_pipeline
        self.cfg, self.pipe = cfg, load_pipeline(cfg, device)

    def sample(self, seeds, target: dict | None = None, mode: str = "distribution", adp=None,
               batch_size: int = 100, **settings) -> torch.Tensor:
        """Images [n, C, H, W] in [-1, 1], image k from seeds[k]; guided to ``target`` with the
        config's ADP (or ``adp``) and guidance section, ``settings`` overriding it."""
        from utils.sampling.pipeline import load_adp_for, plan_batches, sample_seeds
        seeds = [int(s) for s in seeds]
        guide = None
        if target is not None:
            path = adp or RunConfig.of(self.cfg).adp
            if not path:
                raise ValueError(f"config {RunConfig.of(self.cfg).name} names no ADP: pass adp=PATH")
            model = load_adp_for(self.pipe, path, check_grid=False)
            plan = build_plan(self.cfg, mode, _targets(target), model.attributes, {"check": False, **settings},
                              None, model.class_prior)
            guide = build_guide(self.cfg, plan, model, self.pipe.betas)
        out = [sample_seeds(self.pipe, batch, guide)[0] for batch in plan_batches(seeds, batch_size)]
        return torch.cat(out)


def load(config: str | Path, device: str = "auto") -> Sampler:
    """The unconditional model of a config file (``configs/*.yml``), ready to ``sample``."""
    from utils.app.config import load_config
    from utils.app.runtime import pick_device
    return Sampler(load_config(resolve_path(str(config))), pick_device(device))
