"""Text-to-image sampling (every family of ``models.t2i``): the stock diffusers pipeline, a seed
per image, and the guide applied to h through the one h-space hook (``models.hspace``).

``T2IPipeline`` has the ``draw`` / ``timesteps`` / ``model_id`` / ``image_shape`` of
``utils.sampling.pipeline.Pipeline``, so the same batch loop (``sample_batches``), run folders and
guides serve it. With classifier-free guidance a call holds [unconditional rows; conditional
rows] (2n rows for n images): the hook says so in ``Step.n_uncond`` and the guide's settings
decide which rows it reads and edits (``utils.guidance.guide``). Flux has no CFG rows.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from models.files import model_identity
from models.hspace import HSpaceHook, Step
from models.t2i import Family, HSpec
from utils.config import RunConfig

#: what every call passes where the pipeline takes it: images at exactly the asked size (no
#: aspect-ratio binning), captions as given (no cleaning, which needs extra packages)
FIXED_KWARGS = {"use_resolution_binning": False, "clean_caption": False}


class GuidedCalls:
    """Guidance of a diffusers pipeline's calls through h: the one attachment that the command line
    (``T2IPipeline.draw``) and the Python API (``utils.app.api.Balance``) both use.

    While the block is active, a hook (``models.hspace.HSpaceHook``, built from ``hook_kwargs``)
    hands each denoiser call's h to the batch guide of the pipeline call it belongs to. A pipeline
    call begins where it sets its scheduler's timesteps (``set_timesteps`` is wrapped for the block),
    so any number of calls may run inside one block and a scheduler that repeats a timestep (PNDM)
    is counted right. ``start(n)`` gives a call's batch guide (n: its conditional images; None:
    leave h as it is) at its first denoiser step, and ``finish(batch)`` is called when the call is
    over (at the next call's start, or on leaving the block, also after an exception); ``record``:
    a list that gets the conditional rows' h (float16, CPU) of every step.
    """

    def __init__(self, pipe, denoiser: str, hook_kwargs: dict, start: Callable[[int], object],
                 finish: Callable[[object], None] | None = None, record: list | None = None):
        self.pipe, self.start, self.finish, self.record = pipe, start, finish, record
        self.hook = HSpaceHook(getattr(pipe, denoiser), self._edit, **hook_kwargs)
        self._batch, self._i, self._open = None, -1, False

    def __enter__(self) -> "GuidedCalls":
        sched = self.pipe.scheduler
        stock = sched.set_timesteps

        @functools.wraps(stock)                       # keeps the signature the pipelines inspect
        def set_timesteps(*args, **kwargs):
            self._end_call()
            self._open, self._i = True, -1
            return stock(*args, **kwargs)
        self._scheduler = sched
        sched.set_timesteps = set_timesteps
        self.hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._end_call()
        finally:
            self.hook.__exit__(*exc)
            vars(self._scheduler).pop("set_timesteps", None)

    def _edit(self, h, step: Step):
        if not self._open:                # denoiser calls before any set_timesteps: one call
            self._open = True
        if self._i < 0:
            self._batch = self.start(len(h) - step.n_uncond)
        self._i += 1
        if self.record is not None:
            self.record.append(h[step.n_uncond:].detach().to("cpu", torch.float16))
        return None if self._batch is None else self._batch.edit(h, Step(self._i, step.t, step.n_uncond))

    def _end_call(self) -> None:
        if self._open and self._i >= 0 and self._batch is not None and self.finish is not None:
            self.finish(self._batch)
        self._batch, self._i, self._open = None, -1, False


class _Probe(Exception):
    """Raised at the first denoiser call of a probe: the timesteps are set by then."""


@dataclass
class T2IPipeline:
    """A loaded text-to-image pipeline with the sampling settings of a run and one prompt."""
    pipe: object                          # a diffusers text-to-image pipeline (models.t2i.FAMILIES)
    family: str
    fam: Family
    hspec: HSpec
    model_id: dict
    image_shape: tuple[int, int, int]     # (3, height, width) of the decoded images
    device: torch.device
    steps: int
    cfg_scale: float
    eta: float = 0.0
    prompt: str = ""
    negative_prompt: str | None = None
    cache: dict = field(default_factory=dict)      # shared by with_prompt's copies

    def with_prompt(self, prompt: str, negative_prompt: str | None = None) -> "T2IPipeline":
        if negative_prompt and not self.fam.cfg_rows:
            raise ValueError(f"--negative_prompt: the {self.family} family is guidance-distilled (no "
                             f"classifier-free guidance rows), so it takes no negative prompt")
        return dataclasses.replace(self, prompt=prompt, negative_prompt=negative_prompt)

    @property
    def h_shape(self) -> tuple[int, int, int]:
        return self.hspec.shape

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.fam.denoiser)

    @property
    def cfg_active(self) -> bool:
        return self.fam.cfg_rows and self.cfg_scale > 1

    @property
    def timesteps(self) -> list[float]:
        """The scheduler's timesteps for ``steps`` steps, as the stock pipeline sets them (read
        from a probe call stopped at its first denoiser call; kept for later calls)."""
        if "timesteps" not in self.cache:
            def stop(module, args, kwargs):
                raise _Probe
            handle = self.denoiser.register_forward_pre_hook(stop, with_kwargs=True)
            try:
                self.pipe(**self._kwargs([""], [0]))
            except _Probe:
                pass
            finally:
                handle.remove()
            self.cache["timesteps"] = [float(t) for t in self.pipe.scheduler.timesteps]
        return self.cache["timesteps"]

    @property
    def betas(self) -> torch.Tensor:
        """The betas of the guide's step size and cap (``models.t2i.schedule_betas``)."""
        from models.t2i import schedule_betas
        return schedule_betas(self.pipe.scheduler)

    def _kwargs(self, prompts: list[str], seeds: list[int]) -> dict:
        """The stock pipeline's call for these prompts, one CPU generator per image (the same
        images on every device and batch size)."""
        _, height, width = self.image_shape
        kwargs = dict(prompt=prompts, num_inference_steps=self.steps, guidance_scale=self.cfg_scale,
                      generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                      height=height, width=width, output_type="pt")
        if self.negative_prompt:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts)
        takes = self.call_parameters()
        if "eta" in takes:
            kwargs["eta"] = self.eta
        elif self.eta:
            raise ValueError(f"--eta {self.eta}: the {self.family} pipeline samples deterministically (no eta)")
        kwargs.update({k: v for k, v in FIXED_KWARGS.items() if k in takes})
        if self.family in ("pixart_sigma", "sana"):
            kwargs.update(self._sequence_length())
        return kwargs

    def _sequence_length(self) -> dict:
        """PixArt and SANA: ``max_sequence_length`` (the prompt's padded length in ``tokenizer``)
        when the stock default, 300, is longer than the tokenizer holds (a CLIP text encoder, as in
        the digits transformer default); else nothing: the stock default."""
        default = inspect.signature(type(self.pipe).__call__).parameters["max_sequence_length"].default
        limit = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", None)
        return {"max_sequence_length": limit} if isinstance(default, int) and limit and limit < default else {}

    def call_parameters(self) -> set[str]:
        """The keyword arguments the pipeline's ``__call__`` takes."""
        if "takes" not in self.cache:
            self.cache["takes"] = set(inspect.signature(type(self.pipe).__call__).parameters)
        return self.cache["takes"]

    def draw(self, seeds: list[int], batch=None, asymmetric: bool = False,
             record: list | None = None) -> torch.Tensor:
        """Images x0 [n,3,H,W] in [-1,1], image k from the noise of seeds[k] alone; ``batch``: a
        batch guide (its ``edit(h, step)`` at every denoiser call); ``record``: a list that gets
        the conditional rows' h [n,C,H,W] (float16, CPU) of every call."""
        if asymmetric:
            raise ValueError("--asymmetric applies to the unconditional DDIM sampler, not to text-to-image")
        n = len(seeds)
        hook = {**self.hspec.hook_kwargs(), "images": n if self.cfg_active else None}
        with GuidedCalls(self.pipe, self.fam.denoiser, hook, lambda rows: batch, record=record):
            out = self.pipe(**self._kwargs([self.prompt] * n, seeds))
        return out.images.float().cpu() * 2 - 1


def _ddim_move(x: torch.Tensor, out: torch.Tensor, a_model: float, a_from: float, a_to: float,
               prediction: str) -> torch.Tensor:
    """One deterministic DDIM update of latents x (at alpha_bar ``a_from``) to alpha_bar
    ``a_to`` (DDIM eq. 12), from the denoiser's output at alpha_bar ``a_model``: eps, or v
    (eps = sqrt(a) v + sqrt(1 - a) x)."""
    if prediction == "v_prediction":
        out = a_model ** 0.5 * out + (1 - a_model) ** 0.5 * x
    elif prediction != "epsilon":
        raise ValueError(f"inversion of a {prediction} model is not supported (epsilon or v_prediction)")
    x0 = (x - (1 - a_from) ** 0.5 * out) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * out


@torch.no_grad()
def invert(pipe: T2IPipeline, images: torch.Tensor, prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM inversion of images [n,3,H,W] in [-1,1] under ``prompt`` (the empty prompt by
    default; no classifier-free guidance): the VAE's latent mean, then the sampling timesteps
    upwards. Returns (the latents at the first sampling timestep [n,4,h,w], h [n,S,C,H,W] at
    every sampling timestep in sampling order, float16, each read from the inverted latent at
    that timestep, as ``DDIMSampler.invert`` records it). The sd family (SD 1.x / 2.x)."""
    if pipe.family != "sd":
        raise ValueError(f"h from image folders (DDIM inversion) is built for the sd family; the {pipe.family} "
                         f"family's is not yet: use --extract_pseudo with a labeller")
    sd, sched, net = pipe.pipe, pipe.pipe.scheduler, pipe.denoiser
    abar = sched.alphas_cumprod.double()
    prediction = sched.config.prediction_type
    dtype = net.dtype
    x = images.to(pipe.device, dtype)
    z = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
    emb = sd.encode_prompt(prompt, pipe.device, 1, False)[0].expand(len(z), -1, -1)
    seen: list[torch.Tensor] = []
    record = HSpaceHook(net, lambda h, step: seen.append(h.detach().to("cpu", torch.float16)),
                        **pipe.hspec.hook_kwargs())
    ts = sorted(int(round(t)) for t in pipe.timesteps)           # ascending
    hs: dict[int, torch.Tensor] = {}

    def call(latents, t):
        seen.clear()
        with record:
            out = net(latents, t, encoder_hidden_states=emb).sample.double()
        return out, seen[0]
    a = lambda t: 1.0 if t < 0 else float(abar[t])                # noqa: E731
    zz = z.double()
    for j, t_cur in enumerate(ts):
        t_prev = ts[j - 1] if j else -1
        t_model = t_prev if t_prev >= 0 else t_cur               # from x0: the eps of the first timestep
        out, h = call(zz.to(dtype), t_model)
        if t_prev >= 0:
            hs[t_prev] = h
        zz = _ddim_move(zz, out, a(t_model), a(t_prev), a(t_cur), prediction)
    _, hs[ts[-1]] = call(zz.to(dtype), ts[-1])
    order = [int(round(t)) for t in pipe.timesteps]
    return zz.to(dtype), torch.stack([hs[t] for t in order], 1)


#: the model keys a text-to-image config may hold
MODEL_KEYS = {"family", "checkpoint", "resolution", "scheduler", "dtype", "h_module", "h_pool", "h_stream", "h_shape"}


def _pool_setting(value):
    """``model.h_pool``: absent -> the family's default, none/null -> every token, else P >= 1."""
    if value is None or value == "none":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.h_pool {value!r}: an integer P >= 1 (h pooled to P x P cells) or none")
    return value


def load_t2i(cfg: dict, device: torch.device, steps: int | None = None, eta: float | None = None,
             cfg_scale: float | None = None, scheduler: str | None = None) -> T2IPipeline:
    """A text-to-image family's pipeline from a config: ``model: {family, checkpoint:
    FOLDER_OR_HUB_ID, resolution, scheduler, dtype, h_module, h_pool, h_stream, h_shape}``,
    ``sampling: {steps, eta, cfg}``; the arguments override the config."""
    from models.t2i import default_dtype, family_of, h_spec, load_pipeline, model_sha256, resolve_model
    rc = RunConfig.of(cfg)
    m, family = rc.model, rc.family
    fam = family_of(family)
    unknown = sorted(set(m) - MODEL_KEYS)
    if unknown:
        raise ValueError(f"config {rc.name}: unknown model key(s) {unknown} for the {family} family; "
                         f"allowed: {sorted(MODEL_KEYS)}")
    if not m.get("checkpoint"):
        raise ValueError(f"the {family} family needs a model: --model FOLDER_OR_HUB_ID (or model.checkpoint)")
    folder = resolve_model(str(m["checkpoint"]), family)
    pipe = load_pipeline(folder, device, default_dtype(device, m.get("dtype")),
                         scheduler or m.get("scheduler") or fam.scheduler)
    net = getattr(pipe, fam.denoiser)
    native = getattr(net.config, "sample_size", None)
    res = int(m.get("resolution") or (native * pipe.vae_scale_factor if isinstance(native, int) else 1024))
    pool = _pool_setting(m["h_pool"]) if "h_pool" in m else "default"
    spec = h_spec(pipe, family, res, m.get("h_module"), pool, int(m.get("h_stream", -1)))
    if m.get("h_shape") and tuple(m["h_shape"]) != spec.shape:
        raise ValueError(f"model.h_shape {m['h_shape']} of config {rc.name} but {folder} gives "
                         f"{list(spec.shape)} at {spec.module} at {res} px: another model, module or resolution; "
                         f"fix or drop h_shape")
    cfg_scale = float(rc.sampling.cfg if cfg_scale is None else cfg_scale)
    model_id = model_identity(rc.name, m["checkpoint"], model_sha256(folder, family), family=family,
                              h_module=spec.module, h_pool=spec.pool)
    return T2IPipeline(pipe, family, fam, spec, model_id, (3, res, res), device,
                       int(steps if steps is not None else rc.sampling.steps), cfg_scale,
                       float(rc.eta if eta is None else eta))
