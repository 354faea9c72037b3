"""utils/guidance (estimators, the batch guide) and utils/sampling/seeds.py: losses with known values, the h edit on a hand-built ADP,
scale 0 == vanilla sampling bit for bit, and seed -> noise independent of the batch.
"""

import pytest
import torch

from helpers import guide, hand_adp, plan, settings, step_once
from models.adp import ADP
from models.hspace import Step
from utils.guidance.estimators import assign_to_quota, chi_square, quota_counts
from utils.guidance.guide import Guide, RunCovariance
from utils.guidance.settings import SettingsError
from utils.sampling.diffusion import DDIMSampler, Schedule
from utils.sampling.seeds import SeededNoise

SHAPE = (1, 16, 16)


# ---- chi_square ------------------------------------------------------------------------------
P_HAT, P_REF = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5])


def test_chi2_hand_computed():
    assert float(chi_square(P_HAT, P_REF)) == pytest.approx(0.09 / 0.5 * 2)   # 0.36
    assert float(chi_square(P_REF, P_REF)) == pytest.approx(0.0, abs=1e-7)


def test_chi2_gradient_is_2_diff_over_pref():
    p = torch.tensor([0.7, 0.2, 0.1], requires_grad=True)
    ref = torch.tensor([0.2, 0.3, 0.5])
    (g,) = torch.autograd.grad(chi_square(p, ref), p)
    torch.testing.assert_close(g, 2 * (p.detach() - ref) / ref)


# ---- the batch guide on a hand-built ADP ------------------------------------------------------
HALF = {"a": torch.tensor([0.5, 0.5])}


def _p1(adp, h, t):
    return torch.softmax(adp.logits(h, t)["a"], 1)[:, 1]


def test_distribution_mode_raises_minority_class_probability_for_every_sample():
    adp = hand_adp()
    h = torch.tensor([[-2.0, 0.3], [-1.5, -0.2], [-3.0, 1.0], [-2.5, 0.0]]).view(4, 2, 1, 1)
    assert (_p1(adp, h, 10) < 0.1).all()                       # all class 0
    out, b = step_once(adp, HALF, h)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert (_p1(adp, out, 10) > _p1(adp, h, 10)).all()
    torch.testing.assert_close(out[:, 1], h[:, 1])             # only the direction of the head moves
    assert b.after_batch(out).estimate["a"][1] < 0.1           # recorded before the edit


def test_step_is_capped_at_max_step_times_std_norm():
    adp = hand_adp()
    h = torch.full((4, 2, 1, 1), -2.0)
    out, _ = step_once(adp, HALF, h, scale=1e6, max_step=0.25)
    step = (out - h).view(4, -1).norm(dim=1)
    cap = 0.25 * float(adp.std[0].norm())                      # 0.25 * sqrt(2)
    torch.testing.assert_close(step, torch.full((4,), cap), rtol=1e-5, atol=1e-6)
    small, _ = step_once(adp, HALF, h, scale=1e-3, max_step=0.25)
    assert ((small - h).view(4, -1).norm(dim=1) < cap).all()


def test_cap_grows_as_abar_to_the_minus_half_up_to_cap_growth():
    """cap_growth: the cap at timestep t is max_step * min(abar_t^-1/2, cap_growth) * ||std||;
    at zero terminal SNR (abar_t = 0) it is the full growth; without it, the flat cap."""
    adp = hand_adp()
    h = torch.full((4, 2, 1, 1), -2.0)
    base = 0.25 * float(adp.std[0].norm())

    def step_norm(betas, growth):
        g = Guide(plan(HALF, scale=1e6, max_step=0.25, cap_growth=growth), adp, betas)
        out = g.start(list(range(4))).edit(h, Step(0, 10))
        return (out - h).view(4, -1).norm(dim=1)
    betas = torch.full((1000,), 0.5, dtype=torch.float64)          # abar_10 = 0.5^11
    factor = 0.5 ** -5.5
    torch.testing.assert_close(step_norm(betas, 100.0), torch.full((4,), base * factor), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step_norm(betas, 4.0), torch.full((4,), base * 4.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step_norm(betas, None), torch.full((4,), base), rtol=1e-5, atol=1e-6)
    zero_snr = betas.clone()
    zero_snr[10] = 1.0                                             # abar_10 = 0
    torch.testing.assert_close(step_norm(zero_snr, 4.0), torch.full((4,), base * 4.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(SettingsError, match="cap_growth"):
        settings(cap_growth=0.5)


def test_scale_zero_returns_h_unchanged():
    adp = hand_adp()
    h = torch.randn(3, 2, 1, 1)
    out, _ = step_once(adp, HALF, h, scale=0.0)
    assert out is h or torch.equal(out, h)


def test_steps_outside_guided_range_are_untouched():
    adp = hand_adp()
    h = torch.full((2, 2, 1, 1), -2.0)
    b = guide(adp, HALF, first_step=1, last_step=2).start([0, 1])
    assert torch.equal(b.edit(h, Step(0, 10)), h)
    assert torch.equal(b.edit(h, Step(2, 0)), h)                     # t need not even be on the grid
    assert not torch.equal(b.edit(h, Step(1, 0)), h)


def test_sample_mode_pushes_each_sample_to_its_own_class():
    adp = hand_adp()
    h = torch.zeros(4, 2, 1, 1)                                 # undecided: p1 = 0.5
    want = torch.tensor([0, 1, 1, 0])
    b = guide(adp, {"a": torch.tensor([0.0, 1.0])}, mode="sample", classes={"a": 1}).start([0, 1, 2, 3])
    b.classes = {"a": want}                                    # per-sample classes (a test's liberty)
    p1 = _p1(adp, b.edit(h, Step(0, 0)), 0)
    assert (p1[want == 1] > 0.5).all() and (p1[want == 0] < 0.5).all()


def test_ours_on_an_adp_without_directions_says_how_to_get_them():
    adp = hand_adp()
    adp.dir_a.zero_()
    with pytest.raises(ValueError, match="directions_from"):
        guide(adp, HALF)
    guide(adp, HALF, direction="gradient")                     # the plain gradient needs none


def test_run_covariance_is_the_covariance_of_every_batch_so_far_times_the_raw_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g)
    first, second = torch.randn(4, 5, generator=g) * 3 + 1, torch.randn(6, 5, generator=g)
    run = RunCovariance()
    assert run.directions(2, first[:1], {"a": w}) is None            # one sample: no covariance
    run = RunCovariance()
    torch.testing.assert_close(run.directions(2, first, {"a": w})["a"], w @ torch.cov(first.T))
    both = torch.cat([first, second])
    torch.testing.assert_close(run.directions(2, second, {"a": w})["a"], w @ torch.cov(both.T))
    torch.testing.assert_close(run.directions(3, second, {"a": w})["a"], w @ torch.cov(second.T))  # per step


def test_batch_directions_leave_out_what_only_the_training_h_shares():
    """The ADP's stored direction for 'a' also moves h_1 (h_0 and h_1 co-vary in its training
    h); in a batch whose h_1 is the same for every sample, ``direction: batch`` moves h_0 only,
    by Cov_batch(h_0) times the covariance step's gradient."""
    adp = hand_adp()
    with torch.no_grad():
        adp.dir_a[:] = torch.tensor([[-1.0, -0.8], [1.0, 0.8]])
    h = torch.tensor([[-2.0, 0.5], [-1.0, 0.5], [-3.0, 0.5], [-1.5, 0.5]]).view(4, 2, 1, 1)
    stored, _ = step_once(adp, HALF, h)
    ours, _ = step_once(adp, HALF, h, direction="batch")
    assert ((stored - h)[:, 1] > 1e-3).all()                    # the stored direction moves h_1
    torch.testing.assert_close(ours[:, 1], h[:, 1])              # the batch's does not
    var0 = float(h[:, 0].flatten().var())
    torch.testing.assert_close((ours - h)[:, 0], (stored - h)[:, 0] * var0, rtol=1e-4, atol=1e-6)


def test_batch_directions_wait_for_batch_min_samples_at_each_step():
    """batch_min 6: the first batch of 4 steps along the stored directions (and is counted), the
    second along the covariance of all 8."""
    adp = hand_adp()
    with torch.no_grad():
        adp.dir_a[:] = torch.tensor([[-1.0, -0.8], [1.0, 0.8]])
    h = torch.tensor([[-2.0, 0.5], [-1.0, 0.5], [-3.0, 0.5], [-1.5, 0.5]]).view(4, 2, 1, 1)
    stored, _ = step_once(adp, HALF, h)
    g = guide(adp, HALF, direction="batch", batch_min=6)
    torch.testing.assert_close(g.start([0, 1, 2, 3]).edit(h, Step(0, 10)), stored)
    second = g.start([4, 5, 6, 7]).edit(h, Step(0, 10))
    torch.testing.assert_close(second[:, 1], h[:, 1])            # the run's covariance: h_1 constant
    assert g.covariance.sums[0]["n"].item() == 8


def test_batch_directions_need_no_stored_directions_and_fall_back_for_one_sample():
    adp = hand_adp()
    adp.dir_a.zero_()
    h = torch.tensor([[-2.0, 0.5]]).view(1, 2, 1, 1)
    one, _ = step_once(adp, HALF, h, direction="batch")
    plain, _ = step_once(adp, HALF, h, direction="gradient")
    torch.testing.assert_close(one, plain)                       # no covariance of one sample yet


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


def _run(sampler, seeds, g=None):
    noise = SeededNoise(seeds, SHAPE)
    hooks = g.start(seeds).hooks() if g is not None else {}
    x0, _ = sampler.sample(noise.x_T(), noise.step, **hooks)
    return x0


def test_scale_zero_guidance_equals_vanilla_bit_for_bit(sampler):
    seeds = [3, 7, 9]
    adp = _random_adp(sampler)
    vanilla = _run(sampler, seeds)
    zero = _run(sampler, seeds, guide(adp, HALF, scale=0.0))
    assert torch.equal(vanilla, zero)
    guided = _run(sampler, seeds, guide(adp, HALF, scale=5.0))
    assert not torch.equal(vanilla, guided)                    # the edit does reach the images


def test_seed_noise_does_not_depend_on_batch():
    big, one = SeededNoise([3, 4, 5], SHAPE), SeededNoise([4], SHAPE)
    assert torch.equal(big.x_T()[1], one.x_T()[0])
    for i in range(4):
        assert torch.equal(big.step(i)[1], one.step(i)[0])


# ---- quota guidance ---------------------------------------------------------------------------
def test_quota_counts_plain_and_with_earlier_deficit():
    assert quota_counts(torch.tensor([0.5, 0.5]), 5).tolist() in ([3, 2], [2, 3])
    assert quota_counts(torch.tensor([0.2, 0.8]), 10).tolist() == [2, 8]
    assert quota_counts(torch.tensor([0.1] * 10), 20).tolist() == [2] * 10
    # 6 earlier samples, all class 0: want (10*0.5 - 6, 10*0.5 - 0) = (-1, 5) -> clipped (0, 5)
    # -> scaled to the 4 new samples: all of them class 1
    assert quota_counts(torch.tensor([0.5, 0.5]), 4, torch.tensor([6.0, 0.0]), 6).tolist() == [0, 4]


def test_assign_to_quota_keeps_likely_classes_and_meets_counts():
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
    adp = hand_adp()
    h = torch.tensor([[-3.0, 0.0], [-0.2, 0.0], [-2.0, 0.0], [-1.0, 0.0]]).view(4, 2, 1, 1)
    out, _ = step_once(adp, HALF, h, estimator="quota")
    moved = (out - h)[:, 0].flatten()
    # quota 2/2: samples 1 (-0.2) and 3 (-1.0) are the likeliest odd ones: they go up, the rest down
    assert moved[1] > 0 and moved[3] > 0 and moved[0] <= 0 and moved[2] <= 0


# ---- the confusion debias (ours) ---------------------------------------------------------------
def test_debias_estimates_the_batch_through_the_inverse_confusion_matrix():
    """With M = [[.8, .2], [.2, .8]] (a head that reads 20% of each class as the other), a batch
    whose mean prediction is [.6, .4] holds [2/3, 1/3] in truth: the guide's estimate is
    M^-1 p_hat, and its push towards 50/50 is the larger for it."""
    adp = hand_adp()
    with torch.no_grad():
        adp.conf_a.copy_(torch.tensor([[0.8, 0.2], [0.2, 0.8]]).repeat(2, 1, 1))
    p1 = torch.tensor([0.3, 0.5])                              # mean prediction of class 1: 0.4
    h = torch.zeros(2, 2, 1, 1)
    h[:, 0, 0, 0] = torch.log(p1 / (1 - p1)) / 2               # logit_1 - logit_0 = 2 h_0
    plain, b0 = step_once(adp, HALF, h)
    debiased, b1 = step_once(adp, HALF, h, debias=True)
    assert b0.estimate["a"] == pytest.approx([0.6, 0.4], abs=1e-6)
    assert b1.estimate["a"] == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    assert ((debiased - h)[:, 0] > (plain - h)[:, 0]).all() and ((plain - h)[:, 0] > 0).all()
