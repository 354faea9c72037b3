"""What classifier-free guidance does to each prompt's parity, for an ideal model of the training
data: DDIM with the exact score of the weighted training set instead of a U-Net. Needs no trained
denoiser, so a prompt design (configs/digits16_t2i.yml ``prompts:``) can be checked before a
32-minute training run.

    python bench/t2i_cfg_sim.py                          # the config's prompts, CFG 1, 3 and 7.5
    python bench/t2i_cfg_sim.py --cfg 3 7.5 --n 1000 --seed 7
    python bench/t2i_cfg_sim.py --space pixel            # without the checkpoint's VAE
    python bench/t2i_cfg_sim.py --config <a copy of the config with other prompts>   # a candidate design

Each training image i is the Gaussian q(z|x_i) (the VAE's posterior, scaled as in training; in
pixel space a point), weighted by its digit's share in the prompt divided by the number of
training images of that digit. At noise level t the weighted mixture of N(sqrt(abar_t) mu_i,
abar_t s_i^2 + 1 - abar_t) has a closed-form score, so the conditional and unconditional noise
predictions are exact; CFG combines them as the pipeline does (eps_u + w (eps_c - eps_u)) along
the config's DDIM steps. A sample's digit is that of the nearest training latent at the end.

What it showed (docs/RESULTS.md section 4; even share at CFG 3 / 7.5, record 0.80 and 0.20): with
every prompt the empty prompt cut to 0-4 or 5-9 and grey digits (session 7), "a small digit" 0.849
/ 0.887 and "a large digit" 0.096 / 0.035; the U-Nets trained on that design measured 0.833 /
0.887 and 0.113 / 0.047 (3,000 steps, the second model) and 0.850 / 0.910 and 0.080 / 0.037
(5,000 steps; seeds 50000-50299, the judge). For session 8's grey candidate, whose empty
prompt leans against the pull, it predicts 0.818 / 0.825 and 0.179 / 0.169; at CFG 7.5 the
trained U-Net (5,000 steps) moved back by half to two thirds as much: 0.813 / 0.880 and 0.130 /
0.130. The simulator finds the direction and rough size of CFG's pull, not the last points of a
trained model. With the digit sets tinted apart (``tint`` in the config, models/digits_t2i.tinted;
the shipped model since session 9) it predicted, on that model's VAE, 0.802 / 0.830 and 0.120 /
0.084; the trained U-Net measured 0.796 / 0.816 and 0.111 / 0.054 (seeds 0-999). For a tinted
design whose empty prompt leans (15% even among 5-9) it predicted 0.178 / 0.218 for "a large
digit"; the U-Net trained on it measured 0.117 / 0.063 (session 10, seeds 50000-50299): the lean
is not learned. For a stronger bias ("a large digit" 5% even) it predicted 0.024 / 0.010; the
trained U-Net measured 0.019 / 0.002 (seeds 0-999). In pixel space (the tint at full strength,
no VAE) it gives 0.163 / 0.156 and 0.832 / 0.863 (n 1000, seed 0): the tint alone does not
remove the pull. A VAE whose last latent channel carries the colour as a flat map
(``train.colour_weight``, session 11) removes it in the simulator when the channel holds only the
sign of the colour: +-4 gave 0.191 / 0.183 and 0.802 / 0.806 (CFG 1: 0.206 and 0.799). Holding the
colour's magnitude instead pulls every prompt towards its inkier digits (0, 6, 8): +-5 gave 0.253
/ 0.305 and 0.867 / 0.893. The U-Net trained on the +-4 VAE did not follow at CFG 7.5: "a large
digit" 0.192 / 0.293 (seeds 0-999), pulled the other way; on a +-3 VAE (predicted 0.187 / 0.169)
it measured 0.169 / 0.203, but the generic prompts drifted down with the scale, which the
simulator, with its exact empty-prompt score, cannot show (docs/RESULTS.md section 4). On that
VAE the exact score itself loses "a digit" to 0.631 (n 2000; 0.650 on the grey VAE): the stock
schedule's first step starts from pure noise where training saw sqrt(abar_981) z_0, and the colour
channel makes that start lean to the minority set. A zero-terminal-SNR schedule (``train.zero_snr``,
steps from t = 999) gives 0.641, "a large digit" 0.179 / 0.163 (session 13).

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
