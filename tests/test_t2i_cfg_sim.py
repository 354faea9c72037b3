"""scripts/research/t2i_cfg_sim.py: the exact mixture score and what CFG does to a cut prompt, on
small synthetic mixtures with known answers."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "t2i_cfg_sim", Path(__file__).resolve().parent.parent / "scripts" / "research" / "t2i_cfg_sim.py")
_SIM = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_SIM)
cfg_ddim, image_weights, mixture_x0 = _SIM.cfg_ddim, _SIM.image_weights, _SIM.mixture_x0

STEPS = list(range(981, 0, -20))            # DDIM 50, leading spacing, offset 1
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def test_the_mixture_x0_is_tweedies_posterior_mean_of_the_noised_mixture():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    variances = torch.rand(6, 3, generator=gen, dtype=torch.float64) * 0.1
    weights = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.2, 0.1], dtype=torch.float64)
    z = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    a = ABAR[300]
    comps = torch.distributions.Independent(torch.distributions.Normal(a.sqrt() * means,
                                                                       (a * variances + 1 - a).sqrt()), 1)
    density = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights), comps)
    score, = torch.autograd.grad(density.log_prob(z).sum(), z)
    got = mixture_x0(z.detach(), a, means, variances, weights)
    assert torch.allclose(got, (z.detach() + (1 - a) * score) / a.sqrt(), atol=1e-10)    # Tweedie


def test_at_zero_terminal_snr_the_mixture_x0_is_the_weighted_mean_whatever_the_noise():
    means = torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    z = torch.tensor([[5.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    got = mixture_x0(z, torch.zeros((), dtype=torch.float64), means, torch.full_like(means, 0.1), weights)
    assert torch.allclose(got, torch.tensor([[2.5, -0.5]] * 2, dtype=torch.float64))


def test_image_weights_share_each_digit_among_its_images():
    w = image_weights({0: 0.8, 1: 0.2}, np.array([0, 0, 1, 0, 5]))
    assert w.tolist() == pytest.approx([0.8 / 3, 0.8 / 3, 0.2, 0.8 / 3, 0.0])
    with pytest.raises(ValueError, match="no training image"):
        image_weights({7: 1.0}, np.array([0, 1]))


def _clusters():
    """Four clusters of 20 points in 32 dimensions: A (0.8) and B (0.2) make the prompt's set, C
    lies between B and a random point (60% of the way), D elsewhere."""
    gen = torch.Generator().manual_seed(1)
    centre = {n: torch.randn(32, generator=gen, dtype=torch.float64) for n in "ABD"}
    centre["C"] = 0.4 * centre["B"] + 0.6 * torch.randn(32, generator=gen, dtype=torch.float64)
    pts = [centre[n] + 0.3 * torch.randn(20, 32, generator=gen, dtype=torch.float64) for n in "ABCD"]
    return torch.cat(pts), np.repeat(list("ABCD"), 20)


def _share(means, names, cond, uncond, scale):
    idx = cfg_ddim(means, torch.full_like(means, 1e-3), cond, uncond, scale, STEPS, ABAR, 1000, 0).numpy()
    return float(np.mean(names[idx] == "B"))


def test_cfg_keeps_a_cut_at_scale_one_and_pulls_away_from_the_other_sets_neighbour():
    """The prompt {A: 0.8, B: 0.2} cut from an empty prompt that also holds C beside B: CFG 1
    samples the prompt (B ~ 0.2); CFG 7.5 loses B to the pull away from C; an empty prompt
    with fewer B than the cut (against the pull) brings B back towards 0.2."""
    means, names = _clusters()
    per = {n: float((names == n).sum()) for n in "ABCD"}

    def weights(share):
        return torch.tensor([share[n] / per[n] for n in names], dtype=torch.float64)

    cond = weights({"A": 0.8, "B": 0.2, "C": 0.0, "D": 0.0})
    cut = weights({"A": 0.4, "B": 0.1, "C": 0.4, "D": 0.1})
    assert _share(means, names, cond, cut, 1.0) == pytest.approx(0.2, abs=0.04)
    pulled = _share(means, names, cond, cut, 7.5)
    assert pulled < 0.08
    leaning = _share(means, names, cond, weights({"A": 0.48, "B": 0.02, "C": 0.4, "D": 0.1}), 7.5)
    assert leaning > pulled + 0.1


def test_a_feature_that_tells_the_sets_apart_removes_the_pull():
    """The tint's mechanism (models/digits_t2i.tinted): the same clusters with 8 more coordinates,
    +k for the prompt's set (A, B) and -k for the other (C, D). The further apart the sets, the
    less CFG 7.5 thins out B (the cut's share is 0.2): known values 0.02 without the coordinates,
    0.03 at k = 1, 0.07 at 2, 0.12 at 4 (the pull remains while the sets are being told apart,
    when A and B are still blurred into each other but B lies on C's side)."""
    means, names = _clusters()
    per = {n: float((names == n).sum()) for n in "ABCD"}

    def weights(share):
        return torch.tensor([share[n] / per[n] for n in names], dtype=torch.float64)

    cond, cut = weights({"A": 0.8, "B": 0.2, "C": 0.0, "D": 0.0}), weights({"A": 0.4, "B": 0.1, "C": 0.4, "D": 0.1})
    side = torch.as_tensor(np.isin(names, ["A", "B"]) * 2.0 - 1, dtype=torch.float64)[:, None].repeat(1, 8)
    shares = [_share(means, names, cond, cut, 7.5)] + [_share(torch.cat([means, k * side], 1), names, cond, cut, 7.5)
                                                       for k in (1.0, 2.0, 4.0)]
    assert shares == sorted(shares) and shares[0] < 0.04 and shares[-1] > 0.1, shares
