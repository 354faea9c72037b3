"""utils/guidance.py and utils/seeds.py: losses with known values, the h edit on a hand-built ADP,
scale 0 == vanilla sampling bit for bit, and seed -> noise independent of the batch.
"""
import math

import pytest
import torch

from models.adp import ADP
from utils.diffusion import DDIMSampler, Schedule
from utils.guidance import GuidanceConfig, HGuidance, distribution_loss
from utils.seeds import SeededNoise

SHAPE = (1, 16, 16)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


# ---- distribution_loss ------------------------------------------------------------------------
P_HAT, P_REF = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5])


def test_chi2_kl_l2_hand_computed():
    assert float(distribution_loss(P_HAT, P_REF, "chi2")) == pytest.approx(0.09 / 0.5 * 2)   # 0.36
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert float(distribution_loss(P_HAT, P_REF, "kl")) == pytest.approx(kl, rel=1e-5)
    assert float(distribution_loss(P_HAT, P_REF, "l2")) == pytest.approx(0.18)
    for kind in ("chi2", "kl", "l2"):
        assert float(distribution_loss(P_REF, P_REF, kind)) == pytest.approx(0.0, abs=1e-7)


def test_chi2_gradient_is_2_diff_over_pref():
    p = torch.tensor([0.7, 0.2, 0.1], requires_grad=True)
    ref = torch.tensor([0.2, 0.3, 0.5])
    (g,) = torch.autograd.grad(distribution_loss(p, ref, "chi2"), p)
    torch.testing.assert_close(g, 2 * (p.detach() - ref) / ref)


def test_unknown_loss_kind_raises():
    with pytest.raises(ValueError, match="unknown distribution loss 'js'"):
        distribution_loss(P_HAT, P_REF, "js")


# ---- HGuidance on a hand-built ADP ------------------------------------------------------------
def _hand_adp():
    """h_shape (2,1,1), timesteps [10, 0], one binary attribute: logit_1 - logit_0 = 2 h_0.
    mean 0, std 1 and directions = raw weights (identity covariance)."""
    adp = ADP((2, 1, 1), [10, 0], {"a": ["c0", "c1"]})
    w = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    with torch.no_grad():
        for s in range(2):
            adp.weight["a"][s] = w
            adp.dir_a[s] = w
    return adp.eval()


def _cfg(mode="distribution", scale=1.0, **kw):
    targets = {"a": torch.tensor([0.5, 0.5])}
    return GuidanceConfig(mode, targets, {"a": scale}, temperature=1.0, first_step=0, **kw)


def _p1(adp, h, t):
    return torch.softmax(adp.logits(h, t)["a"], 1)[:, 1]


def test_distribution_mode_raises_minority_class_probability_for_every_sample():
    adp = _hand_adp()
    h = torch.tensor([[-2.0, 0.3], [-1.5, -0.2], [-3.0, 1.0], [-2.5, 0.0]]).view(4, 2, 1, 1)
    assert (_p1(adp, h, 10) < 0.1).all()                       # all class 0
    g = HGuidance(adp, _cfg(scale=1.0), BETAS)
    out = g(h, 0, 10)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert (_p1(adp, out, 10) > _p1(adp, h, 10)).all()
    torch.testing.assert_close(out[:, 1], h[:, 1])             # only the direction of the head moves
    assert g.last_distribution["a"][1] < 0.1                   # recorded before the edit


def test_step_is_capped_at_max_step_times_std_norm():
    adp = _hand_adp()
    h = torch.full((4, 2, 1, 1), -2.0)
    g = HGuidance(adp, _cfg(scale=1e6, max_step=0.25), BETAS)
    step = (g(h, 0, 10) - h).view(4, -1).norm(dim=1)
    cap = 0.25 * float(adp.std[0].norm())                      # 0.25 * sqrt(2)
    torch.testing.assert_close(step, torch.full((4,), cap), rtol=1e-5, atol=1e-6)
    small = HGuidance(adp, _cfg(scale=1e-3, max_step=0.25), BETAS)
    assert ((small(h, 0, 10) - h).view(4, -1).norm(dim=1) < cap).all()


def test_scale_zero_returns_h_unchanged():
    adp = _hand_adp()
    h = torch.randn(3, 2, 1, 1)
    out = HGuidance(adp, _cfg(scale=0.0), BETAS)(h, 0, 10)
    assert out is h or torch.equal(out, h)


def test_steps_outside_guided_range_are_untouched():
    adp = _hand_adp()
    h = torch.full((2, 2, 1, 1), -2.0)
    cfg = _cfg(scale=1.0)
    cfg.first_step, cfg.last_step = 1, 2
    g = HGuidance(adp, cfg, BETAS)
    assert torch.equal(g(h, 0, 10), h)
    assert torch.equal(g(h, 2, 0), h)                          # t need not even be on the grid
    assert not torch.equal(g(h, 1, 0), h)


def test_sample_mode_pushes_each_sample_to_its_own_class():
    adp = _hand_adp()
    h = torch.zeros(4, 2, 1, 1)                                 # undecided: p1 = 0.5
    g = HGuidance(adp, _cfg(mode="sample", scale=1.0), BETAS)
    want = torch.tensor([0, 1, 1, 0])
    g.sample_targets = {"a": want}
    p1 = _p1(adp, g(h, 0, 0), 0)
    assert (p1[want == 1] > 0.5).all() and (p1[want == 0] < 0.5).all()


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="distribution' or 'sample"):
        HGuidance(_hand_adp(), _cfg(mode="both"), BETAS)


# ---- end to end on a tiny random ADM -----------------------------------------------------------
@pytest.fixture(scope="module")
def sampler(tiny_adm):
    net = tiny_adm
    sched = Schedule.from_config({"beta_schedule": "linear", "num_diffusion_timesteps": 1000})
    return DDIMSampler(net, sched, num_steps=5, eta=1.0)


def _random_adp(sampler):
    torch.manual_seed(1)
    adp = ADP(sampler.net.h_shape, sampler.timesteps, {"a": ["x", "y"]})
    with torch.no_grad():
        adp.weight["a"].normal_()
        adp.dir_a.normal_()
    return adp.eval()


def _run(sampler, seeds, edit=None):
    noise = SeededNoise(seeds, SHAPE)
    x0, _ = sampler.sample(noise.x_T(), noise.step, edit_h=edit)
    return x0


def test_scale_zero_guidance_equals_vanilla_bit_for_bit(sampler):
    seeds = [3, 7, 9]
    adp = _random_adp(sampler)
    vanilla = _run(sampler, seeds)
    zero = _run(sampler, seeds, HGuidance(adp, _cfg(scale=0.0), sampler.schedule.betas))
    assert torch.equal(vanilla, zero)
    guided = _run(sampler, seeds, HGuidance(adp, _cfg(scale=5.0), sampler.schedule.betas))
    assert not torch.equal(vanilla, guided)                    # the edit does reach the images


def test_seed_noise_does_not_depend_on_batch():
    big, one = SeededNoise([3, 4, 5], SHAPE), SeededNoise([4], SHAPE)
    assert torch.equal(big.x_T()[1], one.x_T()[0])
    for i in range(4):
        assert torch.equal(big.step(i)[1], one.step(i)[0])


# ---- quota guidance ---------------------------------------------------------------------------
def test_quota_counts_plain_and_with_earlier_deficit():
    from utils.guidance import quota_counts
    assert quota_counts(torch.tensor([0.5, 0.5]), 5).tolist() in ([3, 2], [2, 3])
    assert quota_counts(torch.tensor([0.2, 0.8]), 10).tolist() == [2, 8]
    assert quota_counts(torch.tensor([0.1] * 10), 20).tolist() == [2] * 10
    # 6 earlier samples, all class 0: want (10*0.5 - 6, 10*0.5 - 0) = (-1, 5) -> clipped (0, 5)
    # -> scaled to the 4 new samples: all of them class 1
    assert quota_counts(torch.tensor([0.5, 0.5]), 4, torch.tensor([6.0, 0.0]), 6).tolist() == [0, 4]


def test_assign_to_quota_keeps_likely_classes_and_meets_counts():
    from utils.guidance import assign_to_quota
    q = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    got = assign_to_quota(q.log(), torch.tensor([2, 2]))
    assert got.tolist() == [0, 1, 0, 1]               # the least-even even sample moves
    q3 = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.4, 0.1], [0.6, 0.1, 0.3]])
    got = assign_to_quota(q3.log(), torch.tensor([1, 1, 1]))
    assert sorted(got.tolist()) == [0, 1, 2]
    assert got.tolist() == [0, 1, 2] or got.tolist() == [2, 1, 0]
    best = max(([0, 1, 2], [2, 1, 0]), key=lambda a: sum(float(q3[i, c].log()) for i, c in enumerate(a)))
    assert got.tolist() == best


def test_quota_guidance_pushes_the_assigned_sample_across():
    adp = _hand_adp()
    h = torch.tensor([[-3.0, 0.0], [-0.2, 0.0], [-2.0, 0.0], [-1.0, 0.0]]).view(4, 2, 1, 1)
    cfg = _cfg(scale=1.0, estimator="quota", max_step=100.0)
    out = HGuidance(adp, cfg, BETAS)(h, 0, 10)
    moved = (out - h)[:, 0].flatten()
    # quota 2/2: samples 1 (-0.2) and 3 (-1.0) are the likeliest odd ones: they go up, the rest down
    assert moved[1] > 0 and moved[3] > 0 and moved[0] <= 0 and moved[2] <= 0
