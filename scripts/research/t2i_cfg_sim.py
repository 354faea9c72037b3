"""What classifier-free guidance does to each prompt's parity, for an ideal model of the training
data: DDIM with the exact score of the weighted training set instead of a U-Net. Needs no trained
denoiser, so a prompt design (configs/digits16_t2i.yml ``prompts:``) can be checked before a
training run.

    python scripts/research/t2i_cfg_sim.py                 # the config's prompts, CFG 1, 3 and 7.5
    python scripts/research/t2i_cfg_sim.py --cfg 3 7.5 --n 1000 --seed 7
    python scripts/research/t2i_cfg_sim.py --space pixel   # without the checkpoint's VAE
    python scripts/research/t2i_cfg_sim.py --config <a copy of the config with other prompts>   # a candidate design

Each training image i is the Gaussian q(z|x_i) (the VAE's posterior, scaled as in training; in
pixel space a point), weighted by its digit's share in the prompt divided by the number of
training images of that digit. At noise level t the weighted mixture of N(sqrt(abar_t) mu_i,
abar_t s_i^2 + 1 - abar_t) has a closed-form score, so the conditional and unconditional noise
predictions are exact; CFG combines them as the pipeline does (eps_u + w (eps_c - eps_u)) along
the config's DDIM steps. A sample's digit is that of the nearest training latent at the end.

Its predictions beside the measurements of the models trained on each design: docs/RESULTS.md,
section 4.

The guided prediction is combined as x0 (equal to combining eps or v, and defined where abar = 0).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models.digits import load_split
from models.digits_t2i import parse_prompts, training_images
from models.files import resolve_path
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.config import RunConfig


def image_weights(fractions: dict[int, float], labels: np.ndarray) -> torch.Tensor:
    """One weight per training image: its digit's share over the number of images of that digit."""
    w = np.zeros(len(labels))
    for digit, share in fractions.items():
        mask = labels == digit
        if share > 0 and not mask.any():
            raise ValueError(f"digit {digit} has a share of {share} but no training image")
        w[mask] = float(share) / max(mask.sum(), 1)
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)


def mixture_x0(z: torch.Tensor, abar: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """The exact E[z_0 | z_t = z] for z [B, D] under the mixture sum_i weights_i N(means_i,
    variances_i) (diagonal), with z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps; abar may be 0."""
    mean = abar.sqrt() * means
    inv = 1 / (abar * variances + (1 - abar))
    quad = (z ** 2) @ inv.T - 2 * z @ (mean * inv).T + (mean ** 2 * inv).sum(1)[None]
    logp = -0.5 * (quad - inv.log().sum(1)[None]) + weights.clamp_min(1e-300).log()[None]
    r = torch.softmax(logp, dim=1)                                   # responsibilities [B, N]
    # each component's posterior mean: means_i + sqrt(abar) variances_i inv_i (z - sqrt(abar) means_i)
    gain = abar.sqrt() * variances * inv
    return r @ (means - gain * mean) + z * (r @ gain)


def cfg_ddim(means: torch.Tensor, variances: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
             scale: float, timesteps: list[int], alphas_cumprod: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from seeded noise with the guided prediction x0_u + scale
    (x0_c - x0_u) (the same as combining eps or v: each is affine in the other at a given z_t, and
    also defined where abar = 0, the first step of a zero-terminal-SNR schedule); returns the
    index of the nearest mean for each of the n samples."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, means.shape[1], generator=gen, dtype=torch.float64)
    abar = alphas_cumprod.double()
    for i, t in enumerate(timesteps):
        a = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), dtype=torch.float64)
        x_u = mixture_x0(z, a, means, variances, uncond)
        x0 = x_u + scale * (mixture_x0(z, a, means, variances, cond) - x_u)
        e = (z - a.sqrt() * x0) / (1 - a).sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return torch.cdist(z, means).argmin(1)


def _latents(checkpoint: Path, images: torch.Tensor, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    if space == "pixel":
        flat = images.flatten(1).double()
        return flat, torch.full_like(flat, 1e-4)
    from diffusers import AutoencoderKL
    from utils.data.train_t2i import vae_posterior
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae").eval()
    mean, std = vae_posterior(vae, images)
    sf = vae.config.scaling_factor
    return (mean * sf).flatten(1).double(), ((std * sf) ** 2).flatten(1).double()


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16_t2i.yml")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 7.5], help="guidance scales")
    p.add_argument("--n", type=int, default=1000, help="samples per prompt and scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", choices=("latent", "pixel"), default="latent",
                   help="latent: the checkpoint's VAE posteriors (as the U-Net sees them); pixel: the images")
    p.add_argument("--prompts", nargs="+", help="default: every prompt of the config")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    cfg = load_config(args.config)
    specs = {s.text: s for s in parse_prompts(cfg["prompts"])}
    if cfg.get("unconditional") not in specs:
        raise ValueError(f"{args.config}: 'unconditional' must name one of its prompts {list(specs)}")
    unknown = sorted(set(args.prompts or []) - set(specs))
    if unknown:
        raise ValueError(f"--prompts: {unknown} are not prompts of {args.config} ({list(specs)})")
    split = load_split(cfg["model"]["resolution"])
    labels = np.asarray(split.train_y)
    checkpoint = resolve_path(cfg["model"]["checkpoint"])
    means, variances = _latents(checkpoint, training_images(RunConfig.of(cfg).tint, split), args.space)
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_pretrained(checkpoint / "scheduler")
    scheduler.set_timesteps(cfg["sampling"]["steps"])
    steps = scheduler.timesteps.tolist()
    uncond = image_weights(specs[cfg["unconditional"]].digit_fractions(), labels)
    print(f"exact-score CFG, {args.space} space, {len(labels)} training images, {len(steps)} DDIM steps, "
          f"n {args.n}, seed {args.seed}; even share (record in brackets) and share inside the prompt's digits\n")
    print("| prompt | record even | " + " | ".join(f"CFG {w:g}" for w in args.cfg) + " |")
    print("|---|---|" + "---|" * len(args.cfg))
    for text in args.prompts or list(specs):
        fr = specs[text].digit_fractions()
        record = float(sum(v for d, v in fr.items() if d % 2 == 0))
        cells = []
        for w in args.cfg:
            got = labels[cfg_ddim(means, variances, image_weights(fr, labels), uncond, w, steps,
                                  scheduler.alphas_cumprod, args.n, args.seed).numpy()]
            inside = np.isin(got, list(fr)).mean()
            cells.append(f"{np.mean(got % 2 == 0):.3f} ({np.mean(got % 2 == 0) - record:+.3f}), in {inside:.3f}")
        print(f"| {text} | {record:.3f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
