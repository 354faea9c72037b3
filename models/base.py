"""The one interface every U-Net family exposes: encoder to the bottleneck h, decoder from h.

Guidance, extraction and sampling are written once against this interface:

    h, ctx = net.encode(x_t, t)     # runs up to and including the bottleneck (h-space)
    eps = net.decode(h, ctx)        # runs the rest, returns the noise prediction eps
    eps = net(x_t, t)               # == net.decode(*net.encode(x_t, t))
    eps, h, eps_h = net.predict(x_t, t, edit, unedited)   # what the sampler calls (below)

A family that wraps a foreign network without splitting it (``models.diffusers_unet``) overrides
``predict`` and ``forward`` instead: its h is read and replaced by a hook (``models.hspace``).

Subclasses keep their native parameter names so that published checkpoints load with
``strict=True``; this base class adds no parameters.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn


class HSpaceUNet(nn.Module):
    """Base class: ``encode`` / ``decode_raw`` are provided by each family."""

    #: number of image channels the network predicts eps for
    out_image_channels: int = 3
    #: True when the network also predicts a variance (eps = first half of the channels)
    learn_sigma: bool = False
    #: (C, H, W) of the bottleneck for the configured image size
    h_shape: tuple[int, int, int] = (0, 0, 0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network denoises (from its config)."""
        c = self.cfg
        return (int(c.in_channels), int(c.image_size), int(c.image_size))

    def encode(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the network up to and including the bottleneck. Returns (h [N,C,H,W], ctx)."""
        raise NotImplementedError

    def decode_raw(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Run the network from the bottleneck to its native output (all output channels)."""
        raise NotImplementedError

    def decode(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Run the network from the bottleneck; returns eps [N, out_image_channels, H, W]."""
        out = self.decode_raw(h, ctx)
        return out[:, : self.out_image_channels] if self.learn_sigma else out

    def predict(self, x: torch.Tensor, t: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
                unedited: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One network call with h-space between: (eps, the unedited h, eps from the unedited h
        when ``unedited`` and ``edit`` changed h, else None).

        :param edit: h -> the h the decoder continues from (h itself: unchanged).
        """
        h, ctx = self.encode(x, t)
        new = h if edit is None else edit(h)
        eps_h = self.decode(h, ctx) if unedited and new is not h else None
        return self.decode(new, ctx), h, eps_h

    def forward_raw(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native forward pass (learned-sigma channels included)."""
        return self.decode_raw(*self.encode(x, t))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps prediction for x_t at integer timesteps t (shape [N])."""
        return self.decode(*self.encode(x, t))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True) -> torch.Tensor:
    """Sinusoidal timestep embedding [N, dim] (Transformer positional encoding of t).

    ``flip_sin_to_cos=True`` gives [cos, sin] (guided-diffusion); False gives [sin, cos]
    (the DDPM of Ho et al.).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos
                    else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
