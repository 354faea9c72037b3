"""Stable Diffusion (text-to-image) through stock diffusers, with h-space read at ``unet.mid_block``.

The pipeline is diffusers' own (``StableDiffusionPipeline``, or ``StableDiffusionXLPipeline``):
nothing of the U-Net's forward is copied. h-space is the output of ``unet.mid_block``, read and
replaced by a forward hook; a forward pre-hook on the U-Net gives the hook the scheduler's
timestep of the call. h shapes: SD 1.x / 2.x at 512 px 1280x8x8 (64x64 latents, three
downsamplings); SD 2.x at 768 px 1280x12x12; SDXL at 1024 px 1280x32x32 (two downsamplings).

A model is a local diffusers folder (``model_index.json`` with ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id already in the local Hugging Face
cache; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from models.files import read_json_object, resolve_path

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: ``scheduler:`` names -> diffusers scheduler classes (built from the model's scheduler config);
#: ``model``: the folder's own scheduler as saved (e.g. PNDM with skip_prk_steps for SD 1.5)
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}
OWN_SCHEDULER = "model"
SCHEDULER_CHOICES = (*sorted(SCHEDULERS), OWN_SCHEDULER)
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
           "diffusion_pytorch_model.fp16.safetensors", "model.safetensors", "pytorch_model.bin",
           "model.fp16.safetensors")


def resolve_model(spec: str) -> Path:
    """A local pipeline folder: ``spec`` itself (relative to the repository unless absolute or
    present here), or a hub id (``org/name``) resolved from the local Hugging Face cache."""
    for cand in (Path(spec).expanduser(), resolve_path(spec)):
        if cand.is_dir():
            return _check_folder(cand.resolve())
    if spec.count("/") == 1 and not Path(spec).suffix:
        try:
            from huggingface_hub import snapshot_download
            return _check_folder(Path(snapshot_download(spec, local_files_only=True)))
        except Exception as e:                 # not cached (LocalEntryNotFoundError, ...), offline
            raise ValueError(f"model {spec!r} is neither a folder nor a hub id in the local Hugging Face "
                             f"cache ({type(e).__name__}); download it once where there is internet "
                             f"(huggingface-cli download {spec} --local-dir pretrained/NAME) and pass "
                             f"--model pretrained/NAME") from None
    raise ValueError(f"model {spec!r} not found: give a diffusers Stable Diffusion folder "
                     f"(model_index.json, {', '.join(p + '/' for p in PARTS)}) or a cached hub id")


def _check_folder(folder: Path) -> Path:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    name = read_json_object(index, "a diffusers model index (with _class_name)",
                            "restore it from the model's download").get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{folder} holds a {name}; the sd family loads {list(PIPELINES)}")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise ValueError(f"{folder} lacks the sub-folder(s) {missing} of a Stable Diffusion pipeline")
    return folder


def model_sha256(folder: Path) -> str:
    """sha256 over what h depends on: the U-Net's and the text encoder's config and weights."""
    h = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        for f in sorted((folder / part).iterdir()):
            if f.name == "config.json" or f.name in WEIGHTS:
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
    return h.hexdigest()


def default_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """fp16 on CUDA (bf16 if asked), fp32 on CPU, unless ``name`` (float16 | bfloat16 | float32) says."""
    if name:
        if name not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype {name!r}: expected float16, bfloat16 or float32")
        return getattr(torch, name)
    return torch.float16 if device.type == "cuda" else torch.float32


def make_scheduler(config, name: str):
    """A diffusers scheduler of kind ``name`` (``SCHEDULERS``) from a model's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r}: expected one of {list(SCHEDULER_CHOICES)}")
    import diffusers
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def load_sd(folder: Path, device: torch.device, dtype: torch.dtype, scheduler: str = "ddim"):
    """The stock diffusers pipeline of a local folder, on ``device`` in ``dtype``, with the
    scheduler of kind ``scheduler`` (``model``: the folder's own), its progress bar off and no
    safety checker loaded."""
    if scheduler not in SCHEDULER_CHOICES:
        raise ValueError(f"scheduler {scheduler!r}: expected one of {list(SCHEDULER_CHOICES)}")
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()
    kind = json.loads((folder / "model_index.json").read_text())["_class_name"]
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "StableDiffusionPipeline" else {}
    with warnings.catch_warnings():          # newer diffusers rename torch_dtype to dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **extra)
    if scheduler != OWN_SCHEDULER:
        pipe.scheduler = make_scheduler(pipe.scheduler.config, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def h_shape(unet, height: int, vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """(C, H, W) of ``mid_block``'s output for square images of ``height`` px: the last block's
    channels at the latent size halved once per down block but the last."""
    c = unet.config
    side = height // vae_scale_factor // 2 ** (len(c.down_block_types) - 1)
    return int(c.block_out_channels[-1]), int(side), int(side)


class HSpaceHook:
    """While active, every U-Net call hands ``mid_block``'s output h to ``fn(h, t, i)`` (t: the
    scheduler's timestep of the call, i: the call's index from 0) and continues with what it
    returns (None: h unchanged). ``with HSpaceHook(unet, fn): pipe(...)``."""

    def __init__(self, unet, fn: Callable[[torch.Tensor, float, int], torch.Tensor | None]):
        self.unet, self.fn = unet, fn
        self.t, self.i, self._handles = None, -1, []

    def __enter__(self) -> "HSpaceHook":
        self.i = -1
        self._handles = [self.unet.register_forward_pre_hook(self._timestep, with_kwargs=True),
                         self.unet.mid_block.register_forward_hook(self._h)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _timestep(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        self.i += 1

    def _h(self, module, args, output):
        return self.fn(output, self.t, self.i)
