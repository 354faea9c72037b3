"""ADM U-Net (Dhariwal & Nichol 2021, openai/guided-diffusion), with its h-space exposed.

Parameter names follow guided-diffusion's ``UNetModel`` (``time_embed.*``, ``input_blocks.*``,
``middle_block.*``, ``output_blocks.*``, ``out.*``) so that its checkpoints (P2-weighting
CelebA-HQ / FFHQ / MetFaces, ILVR AFHQ-dog, OpenAI 256x256 unconditional ImageNet) load with
``strict=True``. h-space is the output of ``middle_block``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import HSpaceUNet, timestep_embedding


@dataclass
class ADMConfig:
    """Architecture hyper-parameters, named as guided-diffusion's command-line flags."""
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3          # image channels; doubled internally when learn_sigma
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)   # feature-map sizes that get attention
    channel_mult: tuple[int, ...] = ()               # () -> guided-diffusion's default by size
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    conv_resample: bool = True
    learn_sigma: bool = False

    def resolved_channel_mult(self) -> tuple[int, ...]:
        """guided-diffusion's default channel multipliers for an image size."""
        if self.channel_mult:
            return tuple(self.channel_mult)
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
        if self.image_size not in defaults:
            raise ValueError(f"no default channel_mult for image_size {self.image_size}; "
                             "set channel_mult in the config")
        return defaults[self.image_size]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 (as guided-diffusion does under fp16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""


class TimestepSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Strided 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.op = (nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
                   if use_conv else nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (additive, or scale-shift on the 2nd norm)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm
                                 else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(),
                                        nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int,
                 new_order: bool):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels not divisible by num_head_channels "
                                 f"{num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v per head; qkv [B, 3*heads*d, L] -> [B, heads*d, L]."""
        b, width, length = qkv.shape
        d = width // (3 * self.num_heads)
        if self.new_order:      # [q(all heads), k(all heads), v(all heads)]
            q, k, v = (z.reshape(b * self.num_heads, d, length) for z in qkv.chunk(3, dim=1))
        else:                   # legacy: [q, k, v] interleaved per head
            q, k, v = qkv.reshape(b * self.num_heads, 3 * d, length).split(d, dim=1)
        scale = 1 / math.sqrt(math.sqrt(d))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class ADMUNet(HSpaceUNet):
    """guided-diffusion ``UNetModel`` (unconditional), split at the bottleneck."""

    def __init__(self, cfg: ADMConfig):
        super().__init__()
        self.cfg = cfg
        self.learn_sigma = cfg.learn_sigma
        self.out_image_channels = cfg.out_channels
        mc, mult = cfg.model_channels, cfg.resolved_channel_mult()
        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
        emb_dim = 4 * mc

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_heads, cfg.num_head_channels,
                                  cfg.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        ch = int(mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepSequential(
            nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(m * mc))]
                ch = int(m * mc)
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepSequential(
                    res(ch, ch, down=True) if cfg.resblock_updown
                    else Downsample(ch, cfg.conv_resample)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.h_shape = (ch, cfg.image_size // ds, cfg.image_size // ds)
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * m))]
                ch = int(mc * m)
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown
                                  else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        out_ch = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def encode(self, x: torch.Tensor, t: torch.Tensor):
        """x [N,C,H,W], t [N] -> (h [N,*h_shape], (skip features, timestep embedding))."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), (skips, emb)

    def decode_raw(self, h: torch.Tensor, ctx) -> torch.Tensor:
        skips, emb = ctx
        skips = list(skips)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
