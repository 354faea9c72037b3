"""Build a U-Net from a config's ``model:`` section and load its native checkpoint strictly.

Families (``model.family``):
  - ``adm``: guided-diffusion / P2-weighting / ILVR ``UNetModel`` checkpoints (``models/adm_unet.py``)
  - ``ddpm``: Ho et al. DDPM as in ermongroup/ddim, SDEdit, DiffusionCLIP (``models/ddpm_unet.py``)
  - ``diffusers``: a local diffusers ``UNet2DModel`` folder (``models/diffusers_unet.py``)
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from models.base import HSpaceUNet
from models.files import REPO_ROOT, CheckpointError, load_tensors, resolve_path  # noqa: F401 (REPO_ROOT: re-exported)

log = logging.getLogger(__name__)


def dataclass_from_dict(cls, values: dict[str, Any], where: str):
    """Instantiate a config dataclass, rejecting keys it does not have (typos fail loudly)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; "
                         f"allowed: {sorted(names)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**kw)


def _build_adm(arch: dict, where: str) -> HSpaceUNet:
    from models.adm_unet import ADMConfig, ADMUNet
    return ADMUNet(dataclass_from_dict(ADMConfig, arch, where))


def _build_ddpm(arch: dict, where: str) -> HSpaceUNet:
    from models.ddpm_unet import DDPMConfig, DDPMUNet
    return DDPMUNet(dataclass_from_dict(DDPMConfig, arch, where))


def _build_diffusers(arch: dict, where: str) -> HSpaceUNet:
    from models.diffusers_unet import DiffusersUNet
    return DiffusersUNet.from_config_dict(arch, where)


FAMILIES: dict[str, Callable[[dict, str], HSpaceUNet]] = {
    "adm": _build_adm, "ddpm": _build_ddpm, "diffusers": _build_diffusers}
NON_ARCH_KEYS = {"family", "checkpoint", "sha256"}


def build_model(model_cfg: dict, config_name: str = "<config>") -> HSpaceUNet:
    """Instantiate the architecture described by a config's ``model:`` section (random weights)."""
    family = model_cfg.get("family")
    if family not in FAMILIES:
        raise ValueError(f"{config_name}: model.family must be one of {sorted(FAMILIES)}, "
                         f"got {family!r}")
    arch = {k: v for k, v in model_cfg.items() if k not in NON_ARCH_KEYS}
    try:
        return FAMILIES[family](arch, f"{config_name} (model)")
    except (TypeError, ValueError) as e:        # e.g. num_res_blocks: two
        if isinstance(e, ValueError) and "unknown key" in str(e):
            raise
        raise ValueError(f"{config_name}: the model: section does not describe a valid {family} network "
                         f"(a value of the wrong type or size?): {type(e).__name__}: {e}") from None


def read_checkpoint(path: Path, family: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a file (or, for diffusers, a model folder)."""
    if family == "diffusers":
        from models.diffusers_unet import read_diffusers_folder
        return read_diffusers_folder(path)
    sd = load_tensors(path, f"a {family} model checkpoint")
    for wrapper in ("state_dict", "model", "ema"):        # common training-checkpoint wrappers
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if isinstance(sd, (list, tuple)):   # ermongroup/ddim saves [model, optimizer, ...]
        sd = sd[0]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_state_dict_strict(net: torch.nn.Module, sd: dict[str, torch.Tensor],
                           config_name: str, ckpt: Path | str, error: type = None) -> None:
    """``load_state_dict(strict=True)`` with errors that say which keys/layers and which config
    (raised as ``error``, default CheckpointError)."""
    error = error or CheckpointError
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise error(
            f"checkpoint {ckpt} does not match the architecture of config {config_name}: "
            f"{len(missing)} missing key(s) (first: {missing[:5]}), {len(unexpected)} "
            f"unexpected key(s) (first: {unexpected[:5]}). Is it a checkpoint of another model "
            f"family, or does the config name the wrong checkpoint?")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise error(
                f"checkpoint {ckpt} does not match config {config_name}: layer {k} has shape "
                f"{tuple(sd[k].shape)} in the checkpoint but {tuple(v.shape)} in the config's "
                f"architecture; check channels / channel_mult / num_res_blocks in the config.")
    net.load_state_dict(sd, strict=True)


def load_model(model_cfg: dict, config_name: str = "<config>",
               device: str | torch.device = "cpu") -> HSpaceUNet:
    """Build the configured architecture and load ``model.checkpoint`` into it strictly."""
    if not model_cfg.get("checkpoint"):
        raise CheckpointError(f"{config_name}: model.checkpoint is not set; give the path of "
                              f"the weights (or --checkpoint on the command line)")
    path = resolve_path(model_cfg["checkpoint"])
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path} (wanted by config {config_name}). Download it as the "
            f"README's table of supported checkpoints says, or set model.checkpoint.")
    net = build_model(model_cfg, config_name)
    load_state_dict_strict(net, read_checkpoint(path, model_cfg["family"]), config_name, path)
    log.info("loaded %s (%s, %.1fM parameters) from %s", config_name, model_cfg["family"],
             sum(p.numel() for p in net.parameters()) / 1e6, path)
    return net.to(device).eval()
