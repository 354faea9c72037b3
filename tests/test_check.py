"""Checking finished images (ours): the running balance counting a classifier's classes, sample
guidance redrawing misses (SampleCheck), a step cap per attribute, the 'auto' estimator, and the
Frechet distance to real images reweighted to a target class mix.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_latent import guidance_factory, plan_batches, sample_batches
from models.adp import ADP
from utils.commands import build_guidance
from utils.diffusion import DDIMSampler, Schedule
from utils.evaluate import target_weights
from utils.guidance import GuidanceConfig, HGuidance, RunningBalance, SampleCheck, refine_targets
from utils.metrics import frechet_distance

from test_balance import _hand_adp      # 'a' reads h_0, 'b' reads h_1; identity covariance

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
SHAPE = (1, 16, 16)


class FixedLabeller:
    """predict(images) -> the given per-image probabilities, whatever the images."""

    def __init__(self, probs: dict[str, list[list[float]]]):
        self.probs, self.calls = {a: torch.tensor(p) for a, p in probs.items()}, 0

    def predict(self, images):
        self.calls += 1
        return {a: p[:len(images)] for a, p in self.probs.items()}


# ---- running balance with a labeller ----------------------------------------------------------
def test_balance_counts_the_labellers_classes_not_the_guides_estimate():
    lab = FixedLabeller({"a": [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]})
    b = RunningBalance(lab)
    b.update({"a": [0.0, 1.0]}, 3, torch.zeros(3, *SHAPE))      # the ADP said: all class 1
    assert b.count == 3 and b.sums["a"].tolist() == [2.0, 1.0]   # the images: two 0s, one 1
    b.update({"a": [0.5, 0.5]}, 2)                                # no images: the estimate
    assert b.count == 5 and b.sums["a"].tolist() == [3.0, 2.0]


def test_balance_counts_joint_cells_first_attribute_slowest():
    lab = FixedLabeller({"a": [[0.9, 0.1], [0.2, 0.8]], "b": [[0.1, 0.9], [0.2, 0.8]]})
    b = RunningBalance(lab)
    b.update({"a*b": [0.25] * 4}, 2, torch.zeros(2, *SHAPE))
    assert b.sums["a*b"].tolist() == [0.0, 1.0, 0.0, 1.0]       # cells (0,1) and (1,1)


# ---- one step cap per attribute ---------------------------------------------------------------
@pytest.mark.parametrize("per_attribute, expect", [(False, 1.0 / 2 ** 0.5), (True, 1.0)])
def test_step_cap_is_shared_or_per_attribute(per_attribute, expect):
    """Both attributes pushed hard (sample mode, far from the requested classes): with one cap
    the two equal pushes share a step of norm cap (each 1/sqrt 2); per attribute, each gets cap."""
    cfg = GuidanceConfig("sample", {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0, 1.0])},
                         {"a": 1e4, "b": 1e4}, temperature=1.0, first_step=0, max_step=1.0,
                         cap_per_attribute=per_attribute)
    g = HGuidance(_hand_adp(("a", "b")), cfg, BETAS)
    g.sample_targets = {"a": torch.tensor([1]), "b": torch.tensor([1])}
    h = torch.tensor([[-3.0, -3.0]]).view(1, 2, 1, 1)
    step = (g(h, 0, 10) - h).flatten()
    # std = 1, so the cap is max_step * ||std|| = sqrt(2)
    assert step.tolist() == pytest.approx([expect * 2 ** 0.5] * 2, rel=1e-4)


# ---- sample guidance, checked -----------------------------------------------------------------
@pytest.fixture
def pipe(tiny_adm):
    sampler = DDIMSampler(tiny_adm, Schedule.from_config(
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}),
        4, eta=1.0)
    return SimpleNamespace(net=tiny_adm, sampler=sampler, image_shape=SHAPE, device=torch.device("cpu"))


def _random_adp(pipe):
    torch.manual_seed(3)
    adp = ADP(pipe.net.h_shape, pipe.sampler.timesteps, {"a": ["c0", "c1"]})
    with torch.no_grad():
        adp.weight["a"].normal_(std=0.05)
        adp.dir_a.copy_(adp.weight["a"])
    return adp.eval()


def _sample(pipe, check, seeds=(3, 4, 5), calls=None):
    adp = _random_adp(pipe)
    cfg = GuidanceConfig("sample", {"a": torch.tensor([0.0, 1.0])}, {"a": 5.0}, temperature=1.0,
                         first_step=1, max_step=0.2)
    make = guidance_factory(pipe, adp, cfg, {"a": 1}, check=check)

    def spy(batch, boost=1.0):                   # records which seeds are drawn with which cap
        g = make(batch, boost)
        (calls if calls is not None else []).append((list(batch), g.cfg.max_step))
        return g
    spy.check, spy.sample_classes = make.check, make.sample_classes
    (_, im, _), = list(sample_batches(pipe, plan_batches(list(seeds), 8), spy, progress=False))
    return im


def test_check_redraws_only_the_misses_from_their_own_seeds(pipe):
    plain = _sample(pipe, None)
    hit, calls = SampleCheck(FixedLabeller({"a": [[0.1, 0.9]] * 3})), []
    assert (_sample(pipe, hit, calls=calls) == plain).all() and hit.redrawn == 0
    assert calls == [([3, 4, 5], 0.2)]
    miss1 = {"a": [[0.1, 0.9], [0.8, 0.2], [0.1, 0.9]]}
    one, calls = SampleCheck(FixedLabeller(miss1), retries=1, boost=3.0), []
    im = _sample(pipe, one, calls=calls)
    assert one.redrawn == 1 and (im[[0, 2]] == plain[[0, 2]]).all()     # hits kept as they were
    assert calls == [([3, 4, 5], 0.2), ([4], pytest.approx(0.6))]       # the miss: its seed, cap x3
    same = SampleCheck(FixedLabeller(miss1), retries=1, boost=1.0)       # redrawn with the same cap:
    assert (_sample(pipe, same) == plain).all()                          # the same image (same seed)


def test_check_gives_up_after_its_retries(pipe):
    never = SampleCheck(FixedLabeller({"a": [[0.9, 0.1]] * 3}), retries=2)
    _sample(pipe, never)
    assert never.redrawn == 6 and never.labeller.calls == 2


def test_check_is_for_sample_guidance_only(pipe):
    cfg = GuidanceConfig("distribution", {"a": torch.tensor([0.5, 0.5])}, {"a": 1.0})
    with pytest.raises(ValueError, match="sample guidance"):
        guidance_factory(pipe, _random_adp(pipe), cfg, check=SampleCheck(FixedLabeller({})))


# ---- the auto estimator -----------------------------------------------------------------------
def test_auto_estimator_is_quota_for_one_attribute_soft_for_several():
    adp = SimpleNamespace(attributes={"parity": ["even", "odd"], "magnitude": ["low", "high"]})
    cfg = {"guidance": {"estimator": "auto", "distribution_scale": {"default": 1000.0}, "max_step": 2.0,
                        "soft": {"distribution_scale": {"default": 128.0}, "max_step": 1.0}}}
    one, _, _ = build_guidance(cfg, "distribution", {"parity": "0.5"}, adp)
    assert (one.estimator, one.scales["parity"], one.max_step) == ("quota", 1000.0, 2.0)
    two, _, _ = build_guidance(cfg, "distribution", {"parity": "0.5", "magnitude": "0.5"}, adp)
    assert (two.estimator, two.scales["parity"], two.max_step) == ("soft", 128.0, 1.0)
    joint, _, _ = build_guidance(cfg, "distribution", {"parity*magnitude": "uniform"}, adp)
    assert joint.estimator == "soft"
    forced, _, _ = build_guidance(cfg, "distribution", {"parity": "0.5"}, adp, estimator="soft")
    assert forced.estimator == "soft"


# ---- Frechet distance to a reweighted real set ------------------------------------------------
def test_frequency_weights_equal_copies_and_zero_equals_dropping():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 3)), rng.normal(1.0, 2.0, size=(30, 3))
    w = rng.integers(0, 4, size=30)
    copies = np.repeat(b, w, axis=0)
    assert frechet_distance(a, b, w) == pytest.approx(frechet_distance(a, copies), rel=1e-9)
    assert frechet_distance(a, b, np.ones(30)) == pytest.approx(frechet_distance(a, b), rel=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        frechet_distance(a, b, -np.ones(30))


def test_target_weights_give_the_real_set_the_target_mix():
    labels = {"parity": np.array([0, 0, 0, 1]), "magnitude": np.array([0, 1, 0, 1])}
    w = target_weights(labels, {"parity": [0.2, 0.8]})
    assert w.sum() == pytest.approx(4)
    assert w[labels["parity"] == 1].sum() / w.sum() == pytest.approx(0.8)
    both = target_weights(labels, {"parity": [0.5, 0.5], "magnitude": [0.5, 0.5]})
    assert both is None                      # no real image is odd and low: cannot reweight
    assert target_weights(labels, {"digit": [0.1] * 10}) is None
    cells = target_weights(labels, {"parity*magnitude": [0.4, 0.2, 0.0, 0.4]})   # (0,0) (0,1) (1,1)
    assert cells.tolist() == pytest.approx([0.8, 0.8, 0.8, 1.6])   # observed 2/4, 1/4, 0, 1/4


# ---- coarse targets through a finer head (refine) ---------------------------------------------
DIGITS = {"parity": ["even", "odd"], "magnitude": ["low", "high"], "digit": [str(d) for d in range(10)]}
REFINE = {"parity": {"via": "digit", "groups": [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]},
          "magnitude": {"via": "digit", "groups": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}}


def test_refine_spreads_each_class_over_its_finer_classes():
    out, via = refine_targets({"parity": torch.tensor([0.2, 0.8])}, REFINE, DIGITS)
    assert via == {"digit": ["parity"]} and list(out) == ["digit"]
    assert out["digit"].tolist() == pytest.approx([0.04, 0.16] * 5)


def test_refine_of_two_attributes_uses_their_combined_cells():
    """parity 50/50 and magnitude 30/70: cell (even, low) = {0,2,4} gets 0.15 in all, (odd, low)
    = {1,3} 0.15, (even, high) = {6,8} 0.35, (odd, high) = {5,7,9} 0.35."""
    out, _ = refine_targets({"parity": torch.tensor([0.5, 0.5]), "magnitude": torch.tensor([0.3, 0.7])},
                            REFINE, DIGITS)
    want = [0.05, 0.075, 0.05, 0.075, 0.05, 0.35 / 3, 0.175, 0.35 / 3, 0.175, 0.35 / 3]
    assert out["digit"].tolist() == pytest.approx(want, rel=1e-6)
    joint, _ = refine_targets({"parity*magnitude": torch.tensor([0.15, 0.35, 0.15, 0.35])}, REFINE, DIGITS)
    assert joint["digit"].tolist() == pytest.approx(want, rel=1e-6)


def test_refine_leaves_what_it_cannot_refine_and_refuses_an_empty_cell():
    same, via = refine_targets({"digit": torch.full((10,), 0.1)}, REFINE, DIGITS)
    assert via == {} and list(same) == ["digit"]
    both, via = refine_targets({"parity": torch.tensor([0.5, 0.5]), "digit": torch.full((10,), 0.1)},
                               REFINE, DIGITS)
    assert via == {} and set(both) == {"parity", "digit"}     # the finer head already has a target
    holes = {"parity": {"via": "digit", "groups": [[0, 2], [1]]}, "magnitude": {"via": "digit", "groups": [[0, 1], [2]]}}
    with pytest.raises(ValueError, match="no finer class"):    # (odd, high) has no digit
        refine_targets({"parity": torch.tensor([0.5, 0.5]), "magnitude": torch.tensor([0.5, 0.5])}, holes, DIGITS)


def test_build_guidance_guides_through_the_finer_head_but_reports_the_users_targets():
    adp = SimpleNamespace(attributes=DIGITS)
    cfg = {"guidance": {"estimator": "auto", "refine": REFINE, "distribution_scale": {"default": 1000.0},
                        "max_step": 2.0, "soft": {"distribution_scale": {"default": 128.0}}}}
    g, _, resolved = build_guidance(cfg, "distribution", {"parity": "0.8"}, adp, "parity=7")
    assert resolved == {"parity": pytest.approx([0.2, 0.8])}
    assert list(g.targets) == ["digit"] and g.refined == {"digit": ["parity"]}
    assert g.scales == {"digit": 7.0} and g.estimator == "quota"
    off, _, _ = build_guidance(cfg, "distribution", {"parity": "0.8"}, adp, refine=False)
    assert list(off.targets) == ["parity"] and off.refined is None
