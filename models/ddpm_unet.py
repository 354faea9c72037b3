"""DDPM U-Net of Ho et al. (2020) as ported to PyTorch by ermongroup/ddim, with its h-space exposed.

This is the network that SDEdit, DiffusionCLIP and Asyrp load for CelebA-HQ, LSUN-church and
LSUN-bedroom at 256x256. Parameter names follow ermongroup/ddim's ``models/diffusion.py``
(``temb.dense.{0,1}``, ``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``,
``down.{i}.downsample.conv``, ``mid.block_1 / attn_1 / block_2``, ``up.{i}.block.{j}``,
``up.{i}.attn.{j}``, ``up.{i}.upsample.conv``, ``norm_out``, ``conv_out``) so that those
checkpoints load with ``strict=True``. ``up.{i}`` is the decoder level at the same resolution as
``down.{i}`` (ermongroup builds the decoder from the bottom up and prepends each level).

h-space is the output of ``mid.block_2`` (mid: block_1 -> attn_1 -> block_2).

About ``var_type``: in ermongroup/ddim the network never predicts a variance; ``conv_out`` has
exactly ``out_ch`` channels and ``var_type`` (``fixedsmall`` / ``fixedlarge``) is read only by
the sampler to pick the fixed posterior variance. So ``learn_sigma`` is always False here, and
``var_type: learned`` (which ermongroup does not have) is rejected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import HSpaceUNet

VAR_TYPES = ("fixedsmall", "fixedlarge")


@dataclass
class DDPMConfig:
    """Architecture hyper-parameters, named as the ``model:`` section of ermongroup's YAML files.

    ``image_size`` is ermongroup's ``data.image_size`` (the network's ``resolution``). The
    training-only keys ``ema`` / ``ema_rate`` are not architecture and are not accepted.
    ``h_shape`` may be given as a check: it must equal the computed bottleneck shape
    ``(ch * ch_mult[-1], image_size / 2**(len(ch_mult)-1), same)``; ``()`` means "compute it".
    """
    image_size: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)   # feature-map sizes that get self-attention
    dropout: float = 0.0
    resamp_with_conv: bool = True
    var_type: str = "fixedsmall"                # sampler's fixed variance; not architecture
    type: str = "simple"                        # ermongroup's model type; only "simple" exists
    h_shape: tuple[int, ...] = ()

    def __post_init__(self):
        if self.type != "simple":
            raise ValueError(f"DDPMConfig.type must be 'simple' (ermongroup's only network "
                             f"without a learned per-timestep log-variance), got {self.type!r}")
        if self.var_type not in VAR_TYPES:
            raise ValueError(f"DDPMConfig.var_type must be one of {VAR_TYPES}, got "
                             f"{self.var_type!r}; the ermongroup DDPM predicts eps only "
                             f"(no learned variance)")
        if not self.ch_mult:
            raise ValueError("DDPMConfig.ch_mult must list at least one channel multiplier")
        if self.ch % 32:
            raise ValueError(f"DDPMConfig.ch={self.ch} must be a multiple of 32 (GroupNorm(32))")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"DDPMConfig.image_size={self.image_size} must be divisible by "
                             f"2**(len(ch_mult)-1)={factor}")
        computed = self.computed_h_shape()
        if self.h_shape and tuple(self.h_shape) != computed:
            raise ValueError(f"DDPMConfig.h_shape={tuple(self.h_shape)} does not match the "
                             f"architecture's bottleneck {computed}; fix or remove h_shape")

    def computed_h_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the output of ``mid.block_2`` for this configuration."""
        side = self.image_size // 2 ** (len(self.ch_mult) - 1)
        return (self.ch * self.ch_mult[-1], side, side)


def ddpm_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of Ho et al.: t [N] -> [N, dim] = [sin(t f_k), cos(t f_k)].

    f_k = exp(-log(10000) * k / (half - 1)), k = 0..half-1, half = dim // 2; odd dim is
    zero-padded.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [N], got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), the DDPM nonlinearity."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, eps 1e-6, learned affine (as in the DDPM code)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + swish, timestep embedding added after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int,
                 dropout: float, conv_shortcut: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:       # ermongroup's two names for the skip projection
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, H, W], temb [N, T] -> [N, C_out, H, W]."""
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.project_skip(x) + h

    def project_skip(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch: identity, or a conv when the channel count changes."""
        if self.in_channels == self.out_channels:
            return x
        return self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v, proj_out and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> x + proj_out(softmax(q^T k / sqrt(C)) applied to v)."""
        n, c, hgt, wid = x.shape
        z = self.norm(x)
        q = self.q(z).reshape(n, c, hgt * wid)
        k = self.k(z).reshape(n, c, hgt * wid)
        v = self.v(z).reshape(n, c, hgt * wid)
        weights = torch.softmax(torch.einsum("nci,ncj->nij", q, k) * c ** -0.5, dim=2)
        out = torch.einsum("ncj,nij->nci", v, weights).reshape(n, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by 1 then 3x3 stride-2 conv, or 2x2 average pool."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, may be empty) and
    an optional ``downsample`` / ``upsample`` module, as in the DDPM parameter names."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, i: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """ResnetBlock ``i`` then, where this level has attention, AttnBlock ``i``."""
        h = self.block[i](h, temb)
        return self.attn[i](h) if len(self.attn) else h


class DDPMUNet(HSpaceUNet):
    """ermongroup/ddim ``Model`` (type "simple"), split at the bottleneck."""

    def __init__(self, cfg: DDPMConfig):
        super().__init__()
        self.cfg = cfg
        self.out_image_channels = cfg.out_ch
        self.learn_sigma = False
        self.h_shape = cfg.computed_h_shape()
        self.num_levels = len(cfg.ch_mult)
        temb_ch = 4 * cfg.ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(cfg.ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, block_in = self._build_encoder(temb_ch)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout)
        self.up = self._build_decoder(temb_ch, block_in)
        self.norm_out = group_norm(cfg.ch * cfg.ch_mult[0])
        self.conv_out = nn.Conv2d(cfg.ch * cfg.ch_mult[0], cfg.out_ch, 3, padding=1)

    def _level_widths(self) -> list[tuple[int, int, int]]:
        """Per level i: (input width, output width, feature-map size)."""
        c = self.cfg
        in_mult = (1,) + tuple(c.ch_mult)
        return [(c.ch * in_mult[i], c.ch * m, c.image_size // 2 ** i)
                for i, m in enumerate(c.ch_mult)]

    def _build_encoder(self, temb_ch: int) -> tuple[nn.ModuleList, int]:
        """``down.{i}``: num_res_blocks ResnetBlocks (+attn) and, except last, a Downsample."""
        c, levels = self.cfg, nn.ModuleList()
        for i, (w_in, w_out, size) in enumerate(self._level_widths()):
            blocks = [ResnetBlock(w_in if j == 0 else w_out, w_out, temb_ch, c.dropout)
                      for j in range(c.num_res_blocks)]
            attns = ([AttnBlock(w_out) for _ in range(c.num_res_blocks)]
                     if size in c.attn_resolutions else [])
            level = Level(blocks, attns)
            if i != self.num_levels - 1:
                level.downsample = Downsample(w_out, c.resamp_with_conv)
            levels.append(level)
        return levels, self.cfg.ch * c.ch_mult[-1]

    def _build_decoder(self, temb_ch: int, block_in: int) -> nn.ModuleList:
        """``up.{i}``: num_res_blocks + 1 ResnetBlocks fed with skips (+attn), then Upsample."""
        c, levels = self.cfg, []
        for i, (w_in, w_out, size) in reversed(list(enumerate(self._level_widths()))):
            blocks = []
            for j in range(c.num_res_blocks + 1):
                skip = w_in if j == c.num_res_blocks else w_out
                blocks.append(ResnetBlock(block_in + skip, w_out, temb_ch, c.dropout))
                block_in = w_out
            attns = ([AttnBlock(w_out) for _ in range(c.num_res_blocks + 1)]
                     if size in c.attn_resolutions else [])
            level = Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(w_out, c.resamp_with_conv)
            levels.append(level)
        return nn.ModuleList(levels[::-1])          # up[i] is the level at resolution i

    def encode(self, x: torch.Tensor, t: torch.Tensor):
        """x [N, in_channels, S, S], t [N] -> (h [N, *h_shape], (skip features, temb [N, 4ch]))."""
        emb = ddpm_timestep_embedding(t, self.cfg.ch).to(self.temb.dense[0].weight.dtype)
        temb = self.temb.dense[1](swish(self.temb.dense[0](emb)))
        skips = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j in range(self.cfg.num_res_blocks):
                skips.append(level.run(j, skips[-1], temb))
            if i != self.num_levels - 1:
                skips.append(level.downsample(skips[-1]))
        h = self.mid.block_1(skips[-1], temb)
        h = self.mid.block_2(self.mid.attn_1(h), temb)
        return h, (skips, temb)

    def decode_raw(self, h: torch.Tensor, ctx) -> torch.Tensor:
        """h [N, *h_shape] and the encoder's ctx -> eps [N, out_ch, S, S]."""
        skips, temb = ctx
        skips = list(skips)
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j in range(self.cfg.num_res_blocks + 1):
                h = level.run(j, torch.cat([h, skips.pop()], dim=1), temb)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
