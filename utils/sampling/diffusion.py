"""Diffusion math: noise schedules, the DDIM update (DDIM eq. 12), sampling and inversion.

The sampler knows nothing about classifiers: guidance is a callable ``edit_h(h, step)``
(``models.hspace.Step``: step index i, timestep t) that returns an edited bottleneck, applied
between the U-Net's encoder and decoder (``net.predict``), or a callable
``guide_eps(x_t, eps, i, t)`` that returns a guided eps (pixel-space classifier guidance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from models.base import HSpaceUNet
from models.hspace import Edit as HEdit, Step  # noqa: F401 (HEdit: edit_h(h [N,C,H,W], step) -> edited h)
#: guide_eps(x_t [N,C,H,W], eps [N,C,H,W], step index i, timestep t) -> guided eps
EpsGuide = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def beta_schedule(name: str, num_steps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> torch.Tensor:
    """Betas [num_steps] in float64: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal)."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if name == "cosine":
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)
                             for i in range(num_steps)], dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {name!r}: use 'linear' or 'cosine'")


@dataclass
class Schedule:
    """Cumulative products of a noise schedule: alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @classmethod
    def from_config(cls, diffusion_cfg: dict) -> "Schedule":
        betas = beta_schedule(diffusion_cfg.get("beta_schedule", "linear"),
                              int(diffusion_cfg.get("num_diffusion_timesteps", 1000)),
                              float(diffusion_cfg.get("beta_start", 1e-4)),
                              float(diffusion_cfg.get("beta_end", 0.02)))
        return cls(betas, torch.cumprod(1 - betas, dim=0))

    @property
    def num_train_steps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t, with alpha_bar_{-1} = 1 (the step after the last one lands on x0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (forward process, DDPM eq. 4); t [N]."""
        a = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(num_train_steps: int, num_steps: int, skip_type: str = "uniform") -> list[int]:
    """Descending DDIM timesteps tau_S > ... > tau_1.

    ``original``: the grid of the original (Asyrp / Balancing Act) code,
    ``int(linspace(0, 1, S) * (T-1))`` truncated (0, 20, 40, 61, ..., 978, 999 for S = 50): the
    grid its committed classifiers were trained on. ``uniform`` rounds the same points instead
    (0, 20, 41, 61, ..., 979, 999; the digits default's grid); ``leading`` is diffusers' spacing
    (``arange(S) * (T // S)``).
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"number of DDIM steps must be in [1, {num_train_steps}], got {num_steps}")
    if skip_type == "uniform":
        ts = torch.linspace(0, num_train_steps - 1, num_steps).round().long().tolist()
    elif skip_type == "original":
        ts = [int(u * (num_train_steps - 1)) for u in np.linspace(0, 1, num_steps)]
    elif skip_type == "leading":
        ts = [i * (num_train_steps // num_steps) for i in range(num_steps)]
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}: use 'original', 'uniform' or 'leading'")
    return sorted(set(int(t) for t in ts), reverse=True)


def ddim_sigma(a_t: float, a_prev: float, eta: float) -> float:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev) (DDIM eq. 16)."""
    if eta == 0:            # also defined for a_t = 1 and for the inversion direction a_prev < a_t
        return 0.0
    return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)


def ddim_step(eps: torch.Tensor, x_t: torch.Tensor, a_t: float, a_prev: float, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None,
              eps_direction: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t_prev} (DDIM eq. 12). Returns (x_prev, predicted x0).

    :param eps: noise prediction used for the predicted x0.
    :param a_t, a_prev: alpha_bar at the current and the next (smaller) timestep.
    :param eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    :param noise: z ~ N(0, I) for the sigma_t z term (required when eta > 0).
    :param eps_direction: eps for the "direction pointing to x_t" term; defaults to ``eps``.
        Passing the unedited eps here gives Asyrp's asymmetric reverse process.
    """
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)                 # "predicted x0"
    sigma = ddim_sigma(a_t, a_prev, eta)
    direction = eps if eps_direction is None else eps_direction
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * direction
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


class DDIMSampler:
    """DDIM sampling and inversion over a fixed grid of timesteps for one U-Net."""

    def __init__(self, net: HSpaceUNet, schedule: Schedule, num_steps: int = 50,
                 eta: float = 1.0, skip_type: str = "uniform"):
        self.net, self.schedule, self.eta = net, schedule, eta
        self.timesteps = ddim_timesteps(schedule.num_train_steps, num_steps, skip_type)

    def prev_timestep(self, i: int) -> int:
        """The timestep after step i (-1 after the last step, meaning x0)."""
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def _t(self, t: int, n: int, device) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=device)

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, noise_fn: Optional[Callable[[int], torch.Tensor]] = None,
               edit_h: Optional[HEdit] = None, asymmetric: bool = False,
               record_h: bool = False, progress: Optional[Callable] = None,
               guide_eps: Optional[EpsGuide] = None):
        """Run the reverse process from x_T. Returns (x0, hs) where hs [N, S, C, H, W] or None.

        :param noise_fn: i -> z [N,...] for the eta > 0 term (per-sample seeded noise).
        :param edit_h: guidance: h_t -> edited h_t, applied after the encoder at each step.
        :param asymmetric: x0 from the edited eps, direction from the unedited eps (Asyrp).
        :param record_h: also return the (unedited) h at every step.
        :param guide_eps: guidance on eps, applied before the DDIM step (runs under no_grad: a
            guide that needs gradients enables them itself and calls ``self.net``).
        """
        if self.eta > 0 and noise_fn is None:
            raise ValueError(f"DDIMSampler.sample: eta={self.eta} > 0 needs noise_fn "
                             "(e.g. SeededNoise(seeds, shape).step), or use eta=0")
        x, hs = x_T, []
        steps = range(len(self.timesteps))
        for i in (progress(steps) if progress else steps):
            t = self.timesteps[i]
            edit = None if edit_h is None else (lambda h, step=Step(i, t): _same_if_none(edit_h(h, step), h))
            eps, h, eps_dir = self.net.predict(x, self._t(t, len(x), x.device), edit, asymmetric)
            if record_h:
                hs.append(h.float().cpu())
            eps = eps.float()
            if guide_eps is not None:
                eps = guide_eps(x, eps, i, t)
            a_t, a_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(self.prev_timestep(i))
            z = noise_fn(i) if (self.eta > 0 and a_prev < 1) else None
            x, _ = ddim_step(eps, x, a_t, a_prev, self.eta if a_prev < 1 else 0.0, z,
                             None if eps_dir is None else eps_dir.float())
        return x, (torch.stack(hs, dim=1) if record_h else None)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, record_h: bool = False, progress: Optional[Callable] = None):
        """Deterministic DDIM inversion x0 -> x_T over the same grid (eta = 0).

        h is recorded at each sampling timestep tau_i, from the inverted x_{tau_i}, in the same
        order as ``sample`` visits them (t = T-1 first). Returns (x_T, hs [N, S, C, H, W] | None).
        """
        ts = self.timesteps[::-1]                     # ascending: tau_1 < ... < tau_S
        x, hs_by_t = x0, {}
        steps = range(len(ts))
        for j in (progress(steps) if progress else steps):
            t_cur = ts[j]
            t_prev = ts[j - 1] if j > 0 else -1
            # eps is predicted at the point we are at (t_prev), then x moves from t_prev to t_cur
            if t_prev >= 0:
                eps, h, _ = self.net.predict(x, self._t(t_prev, len(x), x.device))
                if record_h:
                    hs_by_t[t_prev] = h.float().cpu()
                eps = eps.float()
            else:
                eps = self.net(x, self._t(t_cur, len(x), x.device)).float()
            a_from, a_to = self.schedule.alpha_bar(t_prev), self.schedule.alpha_bar(t_cur)
            x, _ = ddim_step(eps, x, a_from, a_to, eta=0.0)        # the DDIM update, run upwards
        if record_h:
            _, h, _ = self.net.predict(x, self._t(ts[-1], len(x), x.device))
            hs_by_t[ts[-1]] = h.float().cpu()
            return x, torch.stack([hs_by_t[t] for t in self.timesteps], dim=1)
        return x, None


def _same_if_none(new, h):
    """A guide's answer: None means h unchanged."""
    return h if new is None else new
