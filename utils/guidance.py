"""Guidance in h-space: sample guidance and distribution guidance (Parihar et al. 2024, Sec. 4).

Both are callables ``edit(h, i, t) -> h_edited`` handed to the DDIM sampler; the gradient runs
through the ADP only, never back through the U-Net.

The step (ours; the paper's is a plain h <- h - lambda_t grad_h L): with g = dL/dlogits [N,K]
(autograd through the loss and the softmax only) and E_s = Cov_s(h) W_s^T the ADP's
covariance-preconditioned logit gradients (``ADP.compute_directions``),
    delta_h_i = -lambda_t * N * g_i @ E_s,   lambda_t = scale * beta_t ** beta_power
i.e. a gradient step preconditioned by the covariance of h at that timestep: it moves h along
class-mean differences, which the decoder follows, instead of the raw weight direction, which
it largely ignores (on the digits model the raw gradient moved the odd share by < 4 points at
any scale). N (the batch size, distribution mode) makes the scale independent of batch size,
since p_hat is a batch mean. Each sample's step is clipped to ``max_step`` * ||std_t(h)||, which
bounds the edit and prevents the collapse an over-large step causes (the original's reported
all-black images). ``precondition: none`` gives the plain gradient direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.adp import ADP


def distribution_loss(p_hat: torch.Tensor, p_ref: torch.Tensor, kind: str = "chi2") -> torch.Tensor:
    """Distance of the batch estimate p_hat [K] to the target p_ref [K].

    ``chi2``: sum_c (p_hat_c - p_ref_c)^2 / p_ref_c (original CelebA-HQ code; p_ref_c > 0);
    ``kl``: KL(p_hat || p_ref) (original Stable Diffusion code); ``l2``: ||p_hat - p_ref||^2.
    """
    if kind == "chi2":
        return ((p_hat - p_ref) ** 2 / p_ref.clamp_min(1e-6)).sum()
    if kind == "kl":
        return (p_hat * (p_hat.clamp_min(1e-8).log() - p_ref.clamp_min(1e-8).log())).sum()
    if kind == "l2":
        return ((p_hat - p_ref) ** 2).sum()
    raise ValueError(f"unknown distribution loss {kind!r}: use chi2, kl or l2")


@dataclass
class GuidanceConfig:
    """What to guide and how hard. ``targets``: {attr: [K] fractions} (distribution mode) or
    {attr: [N] class indices} (sample mode)."""
    mode: str                                   # "distribution" | "sample"
    targets: dict[str, torch.Tensor]
    scales: dict[str, float]
    temperature: float = 8.0
    loss: str = "chi2"
    first_step: int = 1                         # guide steps i in [first_step, last_step)
    last_step: int | None = None
    beta_power: float = 0.05
    max_step: float = 0.5
    precondition: str = "covariance"           # "covariance" | "none"
    debias: bool = False                        # estimate p from M_s^-1 p_hat (ADP.calibrate)
    record: dict = field(default_factory=dict)


class HGuidance:
    """The edit applied to h_t at each guided step."""

    def __init__(self, adp: ADP, cfg: GuidanceConfig, betas: torch.Tensor):
        if cfg.debias and cfg.temperature != 1.0:
            raise ValueError("debias=True needs temperature 1 (the ADP is calibrated at tau 1)")
        if cfg.mode not in ("distribution", "sample"):
            raise ValueError(f"guidance mode must be 'distribution' or 'sample', got {cfg.mode!r}")
        self.adp, self.cfg, self.betas = adp, cfg, betas
        self.last_distribution: dict[str, list[float]] = {}
        self.sample_targets: dict[str, torch.Tensor] = {}

    def guided(self, i: int) -> bool:
        last = self.cfg.last_step if self.cfg.last_step is not None else 10 ** 9
        return self.cfg.first_step <= i < last

    def loss(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guidance loss L (a scalar) from the ADP's logits {attr: [N,K]}, scales included."""
        total = next(iter(logits.values())).new_zeros(())
        for a, lg in logits.items():
            q = torch.softmax(lg / self.cfg.temperature, dim=1)           # [N, K]
            self.last_distribution[a] = q.detach().mean(0).cpu().tolist()
            if self.cfg.mode == "distribution":
                p_hat = q.mean(0)
                if self.cfg.debias:
                    p_hat = torch.linalg.solve(self.adp.confusion(a, self._s).to(q), p_hat)
                    self.last_distribution[a] = p_hat.detach().cpu().tolist()
                total = total + self.cfg.scales[a] * distribution_loss(
                    p_hat, self.cfg.targets[a].to(q), self.cfg.loss)
            else:
                c = self.sample_targets[a].to(q.device)
                total = total - self.cfg.scales[a] * q.gather(1, c[:, None]).sum()
        return total

    def __call__(self, h: torch.Tensor, i: int, t: int) -> torch.Tensor:
        if not self.guided(i) or all(s == 0 for s in self.cfg.scales.values()):
            return h
        s = self._s = self.adp.step_index(t)
        attrs = list(self.cfg.targets)
        with torch.enable_grad():
            logits = {a: v.detach().requires_grad_(True)
                      for a, v in self.adp.logits(h.detach(), t, attrs).items()}
            grads = torch.autograd.grad(self.loss(logits), list(logits.values()))
        n = len(h) if self.cfg.mode == "distribution" else 1
        lam = float(self.betas[t]) ** self.cfg.beta_power
        step = torch.zeros(len(h), h[0].numel(), device=h.device)
        for a, g in zip(attrs, grads):
            basis = (self.adp.direction(a, s) if self.cfg.precondition == "covariance"
                     else self.adp.raw_weight(a, s))
            step -= lam * n * g.float() @ basis.to(h.device)
        cap = self.cfg.max_step * float(self.adp.std[s].norm())
        step = step * torch.clamp(cap / step.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        return (h.float() + step.view_as(h)).to(h.dtype)
