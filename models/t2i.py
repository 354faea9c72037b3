"""Text-to-image models through stock diffusers pipelines, each family's h read and edited at a
named module by the one h-space hook (``models.hspace``).

Families (``model.family`` of a config; ``FAMILIES`` holds what differs between them):

  ==============  ===========================  ===========  ==============================
  family          pipeline                     denoiser     h (default ``h_module``)
  ==============  ===========================  ===========  ==============================
  sd              StableDiffusionPipeline      unet         ``mid_block``: 1280x8x8 at 512 px
  sdxl            StableDiffusionXLPipeline    unet         ``mid_block``: 1280x32x32 at 1024 px
  sd3             StableDiffusion3Pipeline     transformer  the middle ``transformer_blocks``
  flux            FluxPipeline                 transformer  the middle ``single_transformer_blocks``
  pixart_sigma    PixArtSigmaPipeline          transformer  the middle ``transformer_blocks``
  sana            SanaPipeline                 transformer  the middle ``transformer_blocks``
  ==============  ===========================  ===========  ==============================

A transformer block's image tokens are pooled to at most ``h_pool`` x ``h_pool`` cells (8: a
head is Linear(64 * width -> K)); ``h_pool: none`` keeps every token. Flux is guidance-distilled:
its ``cfg`` is the distilled guidance scale and a call holds one row per image (no CFG rows).
Flow-matching schedulers (SD3, Flux, SANA) have no betas: the guide's step size and cap use the
variance-preserving schedule with the same signal-to-noise ratio (``flow_betas``).

A model is a local diffusers folder (``model_index.json`` and the pipeline's sub-folders) or a
hub id already in the local Hugging Face cache; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.files import read_json_object, resolve_path
from models.hspace import find_module, h_shape_of


@dataclass(frozen=True)
class Family:
    """What a text-to-image family's pipeline looks like to the hook and the sampler.

    :param pipeline: the diffusers pipeline class of a folder's model_index.json.
    :param denoiser: the pipeline's attribute holding the network the hook goes on.
    :param blocks: the block list whose middle block is the default ``h_module`` (None: mid_block).
    :param patch: latent pixels per image token side (0: a U-Net's feature map).
    :param cfg_rows: classifier-free guidance runs [unconditional; conditional] rows in one call.
    :param t_scale: the scheduler's timestep = the denoiser's timestep input x t_scale.
    :param hashed: the sub-folders whose configs and weights h depends on.
    """
    pipeline: str
    denoiser: str
    blocks: str | None
    patch: int
    cfg_rows: bool
    hashed: tuple[str, ...]
    t_scale: float = 1.0
    scheduler: str = "model"          # the default ``model.scheduler``


FAMILIES: dict[str, Family] = {
    "sd": Family("StableDiffusionPipeline", "unet", None, 0, True, ("unet", "text_encoder"), scheduler="ddim"),
    "sdxl": Family("StableDiffusionXLPipeline", "unet", None, 0, True, ("unet", "text_encoder", "text_encoder_2")),
    "sd3": Family("StableDiffusion3Pipeline", "transformer", "transformer_blocks", 2, True,
                  ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")),
    "flux": Family("FluxPipeline", "transformer", "single_transformer_blocks", 2, False,
                   ("transformer", "text_encoder", "text_encoder_2"), t_scale=1000.0),
    "pixart_sigma": Family("PixArtSigmaPipeline", "transformer", "transformer_blocks", 2, True,
                           ("transformer", "text_encoder")),
    "sana": Family("SanaPipeline", "transformer", "transformer_blocks", 1, True, ("transformer", "text_encoder")),
}
#: the h_pool of a transformer family unless the config says (U-Nets: none)
DEFAULT_POOL = 8
#: ``scheduler:`` names -> diffusers scheduler classes (built from the model's scheduler config);
#: ``model``: the folder's own scheduler as saved (e.g. PNDM with skip_prk_steps for SD 1.5)
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler",
              "flow_euler": "FlowMatchEulerDiscreteScheduler"}
OWN_SCHEDULER = "model"
SCHEDULER_CHOICES = (*sorted(SCHEDULERS), OWN_SCHEDULER)
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
           "diffusion_pytorch_model.fp16.safetensors", "model.safetensors", "pytorch_model.bin",
           "model.fp16.safetensors")


def is_text_to_image(family: str | None) -> bool:
    """Is ``model.family`` one of the text-to-image families?"""
    return family in FAMILIES


def family_of(name: str | None) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family {name!r} is not a text-to-image family: one of {list(FAMILIES)}")
    return FAMILIES[name]


def resolve_model(spec: str, family: str = "sd") -> Path:
    """A local pipeline folder of ``family``: ``spec`` itself (relative to the repository unless
    absolute or present here), or a hub id (``org/name``) resolved from the local Hugging Face cache."""
    fam = family_of(family)
    for cand in (Path(spec).expanduser(), resolve_path(spec)):
        if cand.is_dir():
            return _check_folder(cand.resolve(), family)
    if spec.count("/") == 1 and not Path(spec).suffix:
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception as e:                 # not cached (LocalEntryNotFoundError, ...), offline
            raise ValueError(f"model {spec!r} is neither a folder nor a hub id in the local Hugging Face "
                             f"cache ({type(e).__name__}); download it once where there is internet "
                             f"(huggingface-cli download {spec} --local-dir pretrained/NAME) and pass "
                             f"--model pretrained/NAME") from None
        return _check_folder(folder, family)
    raise ValueError(f"model {spec!r} not found: give a diffusers {fam.pipeline} folder (model_index.json "
                     f"and its sub-folders) or a cached hub id")


def _check_folder(folder: Path, family: str) -> Path:
    """``folder`` if it holds a ``family`` pipeline with every component its index names."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    info = read_json_object(index, "a diffusers model index (with _class_name)", "restore it from the model's download")
    name, want = info.get("_class_name"), FAMILIES[family].pipeline
    if name != want:
        other = [k for k, f in FAMILIES.items() if f.pipeline == name]
        hint = f"; it is a {other[0]} model: use a config with model.family: {other[0]}" if other else ""
        raise ValueError(f"{folder} holds a {name}; the {family} family loads a {want}{hint}")
    parts = [k for k, v in info.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise ValueError(f"{folder} lacks the sub-folder(s) {missing} that its model_index.json names")
    return folder


def model_sha256(folder: Path, family: str = "sd") -> str:
    """sha256 over what h depends on: the denoiser's and the text encoders' config and weights
    (sharded weights too)."""
    h = hashlib.sha256()
    for part in FAMILIES[family].hashed:
        if not (folder / part).is_dir():
            continue
        for f in sorted((folder / part).iterdir()):
            if f.name == "config.json" or f.name in WEIGHTS or (f.suffix == ".safetensors" and "-of-" in f.name):
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


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype, scheduler: str = OWN_SCHEDULER):
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


@dataclass(frozen=True)
class HSpec:
    """Where and how a pipeline's h is read (``models.hspace.HSpaceHook``'s arguments)."""
    module: str
    pool: int | None
    stream: int
    grid: tuple[int, int]
    shape: tuple[int, int, int]
    t_scale: float

    def hook_kwargs(self) -> dict:
        return {"module": self.module, "pool": self.pool, "stream": self.stream, "grid": self.grid,
                "t_scale": self.t_scale}


def default_module(denoiser, family: str) -> str:
    """A family's h module when the config names none: mid_block, or the middle block of its list."""
    blocks = FAMILIES[family].blocks
    return "mid_block" if blocks is None else f"{blocks}.{len(getattr(denoiser, blocks)) // 2}"


def h_spec(pipe, family: str, resolution: int, module: str | None = None, pool="default", stream: int = -1) -> HSpec:
    """The h of ``pipe`` (a ``family`` pipeline) at ``resolution`` px: the module (default: the
    family's mid_block or middle block), its output grid and width, the pooling (``default``: 8
    for a transformer, none for a U-Net; a grid already that small is kept) and h's shape."""
    fam = FAMILIES[family]
    net = getattr(pipe, fam.denoiser)
    module = module or default_module(net, family)
    find_module(net, module)
    c = net.config
    latent = resolution // pipe.vae_scale_factor
    if fam.patch:
        grid = (latent // fam.patch, latent // fam.patch)
        width = int(c.num_attention_heads * c.attention_head_dim)
        if pool == "default":
            pool = DEFAULT_POOL
    else:
        if module != "mid_block":
            raise ValueError(f"h_module {module!r}: the {family} family reads h at mid_block (a U-Net's "
                             f"bottleneck, whose shape is known)")
        side = latent // 2 ** (len(c.down_block_types) - 1)
        grid, width = (side, side), int(c.block_out_channels[-1])
        if pool == "default":
            pool = None
    if pool is not None and min(grid) <= int(pool):
        pool = None
    return HSpec(module, None if pool is None else int(pool), int(stream), grid, h_shape_of(width, grid, pool),
                 fam.t_scale)


def is_flow(scheduler) -> bool:
    """Does the scheduler integrate a flow-matching ODE (timesteps = 1000 sigma)?"""
    c = scheduler.config
    return (type(scheduler).__name__.startswith("FlowMatch") or bool(c.get("use_flow_sigmas"))
            or c.get("prediction_type") == "flow_prediction")


def flow_betas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """The variance-preserving betas [T] with a flow's signal-to-noise ratio at every timestep:
    x_t = (1 - s) x0 + s eps with s = t / T has SNR (1 - s)^2 / s^2, so
    abar_t = (1 - s)^2 / ((1 - s)^2 + s^2) and beta_t = 1 - abar_t / abar_{t-1}."""
    s = torch.arange(num_train_timesteps, dtype=torch.float64) / num_train_timesteps
    abar = (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return (1 - abar / prev).clamp(0, 0.999)


def schedule_betas(scheduler) -> torch.Tensor:
    """The betas the guide's step size and cap read: the scheduler's own, or ``flow_betas``."""
    if is_flow(scheduler):
        return flow_betas(int(scheduler.config.get("num_train_timesteps", 1000)))
    return scheduler.betas


def h_shape(unet, height: int, vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """(C, H, W) of a U-Net's ``mid_block`` output for square images of ``height`` px: the last
    block's channels at the latent size halved once per down block but the last."""
    c = unet.config
    side = height // vae_scale_factor // 2 ** (len(c.down_block_types) - 1)
    return int(c.block_out_channels[-1]), int(side), int(side)
