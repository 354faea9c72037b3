"""Text-to-image sampling (the ``sd`` family): the stock diffusers pipeline, a seed per image, and
the guide applied to h through ``models.sd.HSpaceHook``.

``T2IPipeline`` has the ``draw`` / ``timesteps`` / ``model_id`` / ``image_shape`` of
``utils.sampling.pipeline.Pipeline``, so the same batch loop (``sample_batches``), run folders and
guides serve it. Classifier-free guidance runs the U-Net on [unconditional rows; conditional rows]
(2n rows for n images); ``cfg_rows`` says which rows the guide sees and which it edits:

  - estimate ``cond`` (ours): the batch estimate and the edit come from the n conditional rows;
    estimate ``both`` (the original SD code): from all 2n rows, each row moved by its own gradient;
  - edit ``both`` (default): an image's unconditional row gets the same delta h as its conditional
    row (with estimate ``both``: its own); edit ``cond``: the unconditional rows stay unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from models.sd import HSpaceHook


@dataclass
class T2IPipeline:
    """A loaded Stable Diffusion pipeline with the sampling settings of a run and one prompt."""
    pipe: object                          # a diffusers StableDiffusion(XL)Pipeline
    model_id: dict
    image_shape: tuple[int, int, int]     # (3, height, width) of the decoded images
    h_shape: tuple[int, int, int]
    device: torch.device
    steps: int
    cfg_scale: float
    eta: float = 0.0
    prompt: str = ""
    negative_prompt: str | None = None
    settings: object = None               # GuidanceSettings (cfg_estimate, cfg_edit) when guided

    def with_prompt(self, prompt: str, negative_prompt: str | None = None) -> "T2IPipeline":
        return dataclasses.replace(self, prompt=prompt, negative_prompt=negative_prompt)

    @property
    def timesteps(self) -> list[float]:
        """The scheduler's timesteps for ``steps`` steps (as the pipeline will set them)."""
        sched = self.pipe.scheduler
        sched.set_timesteps(self.steps, device="cpu")
        return [float(t) for t in sched.timesteps]

    @property
    def betas(self) -> torch.Tensor:
        """The model's beta_t [T] (for the guide's step size)."""
        return self.pipe.scheduler.betas

    def draw(self, seeds: list[int], batch=None, asymmetric: bool = False,
             record: list | None = None) -> torch.Tensor:
        """Images x0 [n,3,H,W] in [-1,1], image k from the noise of seeds[k] alone (CPU generators:
        the same on every device and batch size); ``batch``: a batch guide; ``record``: a list
        that gets the conditional rows' h [n,C,H,W] (float16, CPU) of every step."""
        if asymmetric:
            raise ValueError("--asymmetric applies to the unconditional DDIM sampler, not to text-to-image")
        n = len(seeds)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        edit = cfg_rows(batch, n, self.cfg_scale > 1, self.settings, record)
        _, height, width = self.image_shape
        with HSpaceHook(self.pipe.unet, edit):
            out = self.pipe(prompt=[self.prompt] * n,
                            negative_prompt=[self.negative_prompt] * n if self.negative_prompt else None,
                            num_inference_steps=self.steps, guidance_scale=self.cfg_scale, eta=self.eta,
                            generator=gens, height=height, width=width, output_type="pt")
        return out.images.float().cpu() * 2 - 1


def cfg_rows(batch, n: int, cfg_active: bool, settings, record: list | None = None):
    """The hook function ``fn(h, t, i)`` for one batch of n images: records the conditional rows'
    h when asked and hands the rows the settings name to ``batch.edit`` (module docstring)."""
    estimate = getattr(settings, "cfg_estimate", "cond")
    edit_rows = getattr(settings, "cfg_edit", "both")
    mode = getattr(getattr(batch, "g", None), "plan", None)
    per_image = mode is not None and mode.mode == "sample"      # a sample's class is per image

    def fn(h: torch.Tensor, t: float, i: int):
        if record is not None:
            record.append(h[-n:].detach().to("cpu", torch.float16))
        if batch is None:
            return None
        if not cfg_active or len(h) != 2 * n:
            return batch.edit(h, i, t)
        if estimate == "both" and not per_image:
            new = batch.edit(h, i, t)
            return new if edit_rows == "both" else torch.cat([h[:n], new[n:]])
        cond = h[n:]
        new_cond = batch.edit(cond, i, t)
        delta = new_cond - cond
        uncond = h[:n] + delta if edit_rows == "both" else h[:n]
        return torch.cat([uncond, new_cond])
    return fn


def load_t2i(cfg: dict, device: torch.device, steps: int | None = None, eta: float | None = None,
             cfg_scale: float | None = None, scheduler: str | None = None) -> T2IPipeline:
    """The ``sd`` family's pipeline from a config: ``model: {checkpoint: FOLDER_OR_HUB_ID,
    resolution, scheduler, dtype, hook: mid_block}``, ``sampling: {steps, eta, cfg}``; the
    arguments override the config."""
    from models.sd import default_dtype, h_shape, load_sd, model_sha256, resolve_model
    m, s = cfg.get("model") or {}, cfg.get("sampling") or {}
    unknown = sorted(set(m) - {"family", "checkpoint", "resolution", "scheduler", "dtype", "hook", "h_shape"})
    if unknown:
        raise ValueError(f"config {cfg.get('name')}: unknown model key(s) {unknown} for the sd family")
    if m.get("hook", "mid_block") != "mid_block":
        raise ValueError(f"model.hook {m.get('hook')!r}: the sd family reads h at mid_block (the only hook point)")
    if not m.get("checkpoint"):
        raise ValueError("the sd family needs a model: --model FOLDER_OR_HUB_ID (or model.checkpoint)")
    folder = resolve_model(str(m["checkpoint"]))
    pipe = load_sd(folder, device, default_dtype(device, m.get("dtype")), scheduler or m.get("scheduler", "ddim"))
    res = int(m.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    hs = h_shape(pipe.unet, res, pipe.vae_scale_factor)
    if m.get("h_shape") and tuple(m["h_shape"]) != hs:
        raise ValueError(f"model.h_shape {m['h_shape']} of config {cfg.get('name')} but {folder} gives "
                         f"{list(hs)} at {res} px: another model or resolution; fix or drop h_shape")
    cfg_scale = float(s.get("cfg", 7.5) if cfg_scale is None else cfg_scale)
    model_id = {"config": cfg.get("name"), "checkpoint": str(m["checkpoint"]),
                "checkpoint_sha256": model_sha256(folder)}
    return T2IPipeline(pipe, model_id, (3, res, res), hs, device,
                       int(steps if steps is not None else s.get("steps", 50)), cfg_scale,
                       float(s.get("eta", 0.0) if eta is None else eta))
