"""A noise-aware pixel-space classifier p(y | x_t, t) for classifier-guidance baselines.

Dhariwal & Nichol (2021) guide with a classifier trained on noised images x_t at every t; this
is a small one for the embedded default (16x16 grey digits): a conv stem at full resolution,
then three residual conv blocks at 1/2, 1/4 and 1/4 resolution (the digits are 8x8 scans
upsampled, and full-resolution blocks cost 4x the CPU time). The sinusoidal timestep embedding
(``models.base.timestep_embedding``) goes through an MLP and is added to the features of every
block; one linear head per attribute.
GroupNorm, not BatchNorm, so each sample's logits depend on that sample only (sample guidance
needs per-sample gradients).

A checkpoint carries its kind, architecture config, attribute and class names, the diffusion
schedule it was trained for, its data source and metrics; it loads strictly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.adp import ClassifierMismatchError
from models.base import timestep_embedding
from models.files import load_tensors
from models.loader import load_state_dict_strict
from models.digits import ATTRIBUTES

PIXEL_CLF_KIND = "balancing-act/pixel-classifier-v1"


@dataclass
class PixelClassifierConfig:
    """Architecture of a ``NoisyPixelClassifier``."""
    image_size: int = 16
    in_channels: int = 1
    width: int = 32                 # channels of the first block; the next two have 2x
    emb_dim: int = 64               # sinusoidal timestep embedding size
    hidden: int = 128               # width of the shared layer before the heads
    attributes: dict[str, list[str]] = field(
        default_factory=lambda: {a: list(c) for a, c in ATTRIBUTES.items()})


class TimeResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(t_emb), GN-SiLU-conv, with a residual (1x1 conv when widths differ)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, c_in), nn.SiLU(),
                                       nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Linear(t_dim, c_out)
        self.out_layers = nn.Sequential(nn.GroupNorm(8, c_out), nn.SiLU(),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(temb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class NoisyPixelClassifier(nn.Module):
    """x_t [N,C,S,S] in the model's scale, t [N] -> {attribute: logits [N,K]}."""

    def __init__(self, cfg: PixelClassifierConfig):
        super().__init__()
        if cfg.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {cfg.image_size}")
        self.cfg, w, e = cfg, cfg.width, cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, 4 * w), nn.SiLU(), nn.Linear(4 * w, 4 * w))
        self.stem = nn.Conv2d(cfg.in_channels, w, 3, padding=1)
        self.blocks = nn.ModuleList([TimeResBlock(w, w, 4 * w), TimeResBlock(w, 2 * w, 4 * w),
                                     TimeResBlock(2 * w, 2 * w, 4 * w)])
        side = cfg.image_size // 4
        self.trunk = nn.Sequential(nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.Flatten(),
                                   nn.Linear(2 * w * side * side, cfg.hidden), nn.SiLU())
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.hidden, len(c)) for a, c in cfg.attributes.items()})

    @property
    def attributes(self) -> dict[str, list[str]]:
        return self.cfg.attributes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        temb = self.time_mlp(timestep_embedding(t, self.cfg.emb_dim))
        h = F.avg_pool2d(self.stem(x), 2)                       # 16 -> 8 px
        for k, block in enumerate(self.blocks):
            h = block(h, temb)
            if k == 0:
                h = F.avg_pool2d(h, 2)                              # 8 -> 4 px
        f = self.trunk(h)
        return {a: head(f) for a, head in self.heads.items()}

    # ---- checkpoints -------------------------------------------------------------------
    def save(self, path: str | Path, diffusion: dict, data_source: dict, metrics: dict,
             command: str = "") -> None:
        """Write a self-describing checkpoint (kind, config, classes, schedule, metrics)."""
        torch.save({"kind": PIXEL_CLF_KIND, "config": asdict(self.cfg), "attributes": self.attributes,
                    "diffusion": dict(diffusion), "data_source": data_source, "metrics": metrics,
                    "command": command, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path, expect_diffusion: dict | None = None,
             device: str | torch.device = "cpu") -> "NoisyPixelClassifier":
        """Load strictly; refuse another kind of file or a classifier for another noise schedule."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"pixel classifier checkpoint not found: {path}. Train one with "
                                    f"`python scripts/train_pixel_classifier.py --out {path}`")
        ck = load_tensors(path, "a pixel classifier checkpoint", ClassifierMismatchError)
        if not isinstance(ck, dict) or ck.get("kind") != PIXEL_CLF_KIND:
            kind = ck.get("kind") if isinstance(ck, dict) else type(ck).__name__
            raise ClassifierMismatchError(f"{path} is not a pixel classifier checkpoint "
                                          f"(kind={kind!r}, expected {PIXEL_CLF_KIND!r})")
        if expect_diffusion is not None and _schedule_key(ck["diffusion"]) != _schedule_key(expect_diffusion):
            raise ClassifierMismatchError(
                f"{path} was trained on x_t of the schedule {ck['diffusion']}, but the model uses "
                f"{dict(expect_diffusion)}; retrain it (scripts/train_pixel_classifier.py --config ...)")
        net = cls(PixelClassifierConfig(**ck["config"]))
        load_state_dict_strict(net, ck["state_dict"], f"pixel classifier {ck['config']}", path,
                               ClassifierMismatchError)
        net.meta = {k: ck.get(k) for k in ("diffusion", "data_source", "metrics", "command")}
        return net.to(device).eval()


def _schedule_key(d: dict) -> tuple:
    return (d.get("beta_schedule", "linear"), int(d.get("num_diffusion_timesteps", 1000)),
            float(d.get("beta_start", 1e-4)), float(d.get("beta_end", 0.02)))


# ---- training and evaluation ---------------------------------------------------------------
def train_pixel_classifier(net: NoisyPixelClassifier, x: torch.Tensor, labels: dict[str, torch.Tensor],
                           schedule, steps: int = 3000, batch: int = 128, lr: float = 2e-3,
                           seed: int = 0, augment_fn=None, progress=None) -> list[float]:
    """Train on x_t = q_sample(aug(x0), t, eps), t ~ U{0..T-1} (sum of cross-entropies over heads).

    :param x: real images [N,C,S,S] in [-1,1]; labels: {attribute: class index [N]}.
    :param schedule: ``utils.sampling.diffusion.Schedule`` of the model to guide.
    :param augment_fn: (images, generator) -> images, applied to x0 before noising.
    Returns the loss every 100 steps (for the record).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    net.train()
    losses, it = [], range(steps)
    for k in (progress(it) if progress else it):
        idx = torch.randint(len(x), (batch,), generator=gen)
        x0 = augment_fn(x[idx], gen) if augment_fn else x[idx]
        t = torch.randint(schedule.num_train_steps, (batch,), generator=gen)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        logits = net(x_t, t)
        loss = sum(F.cross_entropy(logits[a], labels[a][idx]) for a in net.attributes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if k % 100 == 0:
            losses.append(round(float(loss.detach()), 4))
    return losses


@torch.no_grad()
def noisy_accuracy(net: NoisyPixelClassifier, x: torch.Tensor, labels: dict[str, torch.Tensor],
                   schedule, timesteps=(0, 250, 500, 750), seed: int = 1) -> dict[str, dict[str, float]]:
    """Accuracy of the argmax per attribute on x noised to each t (fixed noise): {t: {attr: acc}}."""
    net.eval()
    gen, out = torch.Generator().manual_seed(seed), {}
    for t in timesteps:
        tt = torch.full((len(x),), int(t), dtype=torch.long)
        logits = net(schedule.q_sample(x, tt, torch.randn(x.shape, generator=gen)), tt)
        out[str(t)] = {a: round(float((lg.argmax(1) == labels[a]).float().mean()), 4)
                       for a, lg in logits.items()}
    return out
