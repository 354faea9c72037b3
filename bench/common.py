"""Pieces the cost benchmarks share."""
from __future__ import annotations

import torch

from models.adp import ADP


def random_adp(pipe, seed: int = 0) -> ADP:
    """Random gender heads on the pipeline's timesteps (weights N(0, 0.01^2)), directions = the
    heads, class fractions 50/50: guidance costs what it would with trained heads."""
    torch.manual_seed(seed)
    adp = ADP(pipe.h_shape, list(dict.fromkeys(int(round(t)) for t in pipe.timesteps)), {"gender": ["female", "male"]})
    with torch.no_grad():
        for s in range(len(adp.timesteps)):
            adp.weight["gender"][s] = torch.randn(2, adp.mean.shape[1]) * 0.01
            adp.dir_gender[s] = adp.raw_weight("gender", s)
    adp.class_prior = {"gender": [0.5, 0.5]}
    return adp.to(pipe.device).eval()
