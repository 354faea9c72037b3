"""A diffusers ``UNet2DModel`` (e.g. google/ddpm-celebahq-256), wrapped to expose its h-space.

The wrapper holds the diffusers model unchanged as ``self.unet`` (its parameters are therefore
``unet.<diffusers name>``) and calls its stock forward; h-space is the output of ``mid_block``,
read and replaced by the forward hook every diffusers family uses (``models.hspace``).
Class-conditional models and models without a mid block are rejected. Nothing is ever
downloaded: a checkpoint is a local model folder.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from models.base import HSpaceUNet
from models.hspace import HSpaceHook

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREFIX = "unet."
# keys that the wrapper reads from a config's model section besides UNet2DModel's own kwargs
WRAPPER_KEYS = {"folder", "h_shape", "learn_sigma"}
# attention parameter names of diffusers < 0.15 (AttentionBlock) -> current Attention names
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                              "proj_attn": "to_out.0"}


def _unet_class():
    """diffusers' ``UNet2DModel`` (imported lazily: diffusers is only needed for this family)."""
    from diffusers import UNet2DModel
    return UNet2DModel


def model_folder(path: str | Path) -> Path:
    """The folder that holds ``config.json``: ``path`` itself, or its ``unet/`` subfolder
    (the layout of a saved pipeline)."""
    path = Path(path)
    for cand in (path, path / "unet"):
        if (cand / "config.json").is_file():
            return cand
    raise ValueError(f"{path} is not a diffusers model folder: no config.json in it or in its "
                     f"unet/ subfolder. Save one with UNet2DModel.save_pretrained(folder), or "
                     f"download a model repository (e.g. google/ddpm-celebahq-256) into it.")


def read_folder_config(path: str | Path) -> dict[str, Any]:
    """The UNet2DModel kwargs stored in a model folder's config.json (``_``-keys dropped)."""
    folder = model_folder(path)
    cfg = json.loads((folder / "config.json").read_text())
    name = cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{folder}/config.json describes a {name}, not a UNet2DModel")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _weights_file(path: Path) -> Path:
    """The weights file of a model folder (safetensors preferred), or ``path`` if it is a file."""
    if path.is_file():
        return path
    folder = model_folder(path)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("diffusion_pytorch_model*.index.json")):
        raise ValueError(f"{folder} holds a sharded checkpoint, which is not supported; "
                         f"re-save it with UNet2DModel.save_pretrained(max_shard_size='100GB')")
    raise ValueError(f"no weights in {folder}: expected one of {list(WEIGHT_FILES)}")


def rename_deprecated_attention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map old diffusers attention names (``attentions.N.query`` ...) to current ones
    (``attentions.N.to_q`` ...), as diffusers itself does when it loads an old checkpoint."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in DEPRECATED_ATTENTION_NAMES:
            parts[-2] = DEPRECATED_ATTENTION_NAMES[parts[-2]]
        out[".".join(parts)] = value
    return out


def read_diffusers_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a diffusers model folder, keyed as ``DiffusersUNet.state_dict()``
    (``unet.`` + the diffusers parameter name)."""
    weights = _weights_file(Path(path))
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(weights), device="cpu")
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    return {PREFIX + k: v for k, v in rename_deprecated_attention(sd).items()}


def _check_unet_kwargs(kwargs: dict[str, Any], where: str) -> None:
    """Reject keys that ``UNet2DModel.__init__`` does not take (typos fail loudly)."""
    allowed = set(inspect.signature(_unet_class().__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for a diffusers UNet2DModel; "
                         f"allowed: {sorted(allowed | WRAPPER_KEYS)}")


def _bottleneck_shape(unet) -> tuple[int, int, int]:
    """(C, H, W) of the mid block's output: every down block but the last halves H and W."""
    cfg = unet.config
    size = cfg.sample_size
    if size is None:
        raise ValueError("the UNet2DModel config has no sample_size; set sample_size so that "
                         "the h-space shape is known")
    hgt, wid = (size, size) if isinstance(size, int) else tuple(size)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if hgt % factor or wid % factor:
        raise ValueError(f"sample_size {size} is not divisible by {factor} (one halving per "
                         f"down block but the last)")
    return (cfg.block_out_channels[-1], hgt // factor, wid // factor)


class DiffusersUNet(HSpaceUNet):
    """``UNet2DModel`` with h-space at its ``mid_block``; the eps prediction is
    ``UNet2DModel(x, t).sample`` (its first half when ``learn_sigma``)."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    def __init__(self, unet, learn_sigma: bool = False):
        super().__init__()
        if unet.class_embedding is not None:
            raise ValueError("class-conditional UNet2DModels (class_embed_type / "
                             "num_class_embeds) are not supported: encode/decode take no labels")
        if unet.mid_block is None:
            raise ValueError("UNet2DModel with mid_block_type=None has no mid block, so no "
                             "h-space; use a model with a UNetMidBlock2D")
        out_ch = unet.config.out_channels
        if learn_sigma and out_ch % 2:
            raise ValueError(f"learn_sigma needs an even out_channels (eps and variance), got "
                             f"{out_ch}")
        self.unet = unet
        self.learn_sigma = learn_sigma
        self.out_image_channels = out_ch // 2 if learn_sigma else out_ch
        self.h_shape = _bottleneck_shape(unet)

    @classmethod
    def from_config_dict(cls, arch: dict[str, Any], where: str = "<config>") -> "DiffusersUNet":
        """Build from a config's model section (random weights).

        ``arch`` holds either ``folder:`` (a local diffusers model folder; its config.json gives
        the architecture) or UNet2DModel's kwargs; optionally ``learn_sigma`` and ``h_shape``
        (checked against the computed bottleneck shape).
        """
        from models.files import resolve_path
        arch = dict(arch)
        folder, h_shape = arch.pop("folder", None), arch.pop("h_shape", None)
        learn_sigma = bool(arch.pop("learn_sigma", False))
        if folder and arch:
            raise ValueError(f"{where}: give either folder: or UNet2DModel kwargs, not both "
                             f"(got folder and {sorted(arch)})")
        if folder:
            kwargs = read_folder_config(resolve_path(folder))
            unet = _unet_class().from_config(kwargs)
        elif not arch:
            raise ValueError(f"{where}: a diffusers model needs folder: <local model folder> or "
                             f"the UNet2DModel kwargs (block_out_channels, down_block_types, ...)")
        else:
            _check_unet_kwargs(arch, where)
            unet = _unet_class()(**arch)
        net = cls(unet, learn_sigma=learn_sigma)
        if h_shape is not None and tuple(h_shape) != net.h_shape:
            raise ValueError(f"{where}: h_shape {tuple(h_shape)} does not match the "
                             f"architecture's bottleneck {net.h_shape}; fix or remove h_shape")
        return net

    def forward_raw(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``UNet2DModel(x, t).sample`` (learned-sigma channels included)."""
        return self.unet(x, t).sample

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.forward_raw(x, t)
        return out[:, : self.out_image_channels] if self.learn_sigma else out

    def predict(self, x: torch.Tensor, t: torch.Tensor, edit=None, unedited: bool = False):
        """``HSpaceUNet.predict`` through the h-space hook on ``mid_block``: one call of the stock
        forward, h read (and replaced by ``edit(h)``) there; the unedited eps, when asked and h
        was edited, from a second call."""
        seen: dict[str, torch.Tensor] = {}

        def fn(h, step):
            seen["h"] = h
            seen["new"] = h if edit is None else edit(h)
            return seen["new"]
        with HSpaceHook(self.unet, fn, "mid_block"):
            eps = self(x, t)
        eps_h = self(x, t) if unedited and seen["new"] is not seen["h"] else None
        return eps, seen["h"], eps_h

