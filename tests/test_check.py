"""Checking finished images (ours): the running balance counting a classifier's classes, sample
guidance redrawing misses, the shared step cap, the 'auto' estimator, refine, and the Frechet
distance to real images reweighted to a target class mix.
"""

import numpy as np
import pytest
import torch

from helpers import BETAS, guide, hand_adp as _hand_adp      # 'a' reads h_0, 'b' reads h_1
from models.adp import ADP
from models.hspace import Step
from utils.evaluation.evaluate import target_weights
from utils.evaluation.metrics import frechet_distance
from utils.guidance import build_plan
from utils.guidance.guide import RunningBalance
from utils.guidance.targets import refine_targets
from utils.sampling.diffusion import DDIMSampler, Schedule
from utils.sampling.pipeline import Pipeline, plan_batches, sample_batches, sample_seeds

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


def test_balance_counts_the_labellers_probabilities_with_count_probability():
    lab = FixedLabeller({"a": [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]],
                         "b": [[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]]})
    b = RunningBalance(lab, probability=True)
    b.update({"a": [0.0, 1.0], "a*b": [0.25] * 4}, 3, torch.zeros(3, *SHAPE))
    assert b.sums["a"].tolist() == pytest.approx([1.8, 1.2])    # the expected count, not [2, 1]
    # joint cells: the product of each image's probabilities, summed over the images
    assert b.sums["a*b"].tolist() == pytest.approx([0.45 + 0.6 + 0.06, 0.45 + 0.24,
                                                    0.05 + 0.4 + 0.14, 0.05 + 0.56])


def test_the_count_setting_reaches_the_running_balance():
    from utils.guidance.settings import resolve_settings
    assert resolve_settings({"preset": "ours"}).count == "class"
    assert resolve_settings({"preset": "ours", "count": "probability"}).count == "probability"
    with pytest.raises(ValueError, match="count"):
        resolve_settings({"preset": "ours", "count": "soft"})
    lab = FixedLabeller({"a": [[0.6, 0.4]] * 4})
    for count, want in (("class", [4.0, 0.0]), ("probability", [2.4, 1.6])):
        g = guide(_hand_adp(("a",)), {"a": torch.tensor([0.5, 0.5])}, labeller=lab, count=count,
                  running_balance=True, check=True)
        assert g.balance is not None and g.balance.probability == (count == "probability")
        g.balance.update({"a": [0.5, 0.5]}, 4, torch.zeros(4, *SHAPE))
        assert g.balance.sums["a"].tolist() == pytest.approx(want)


# ---- one step cap, shared by the attributes ---------------------------------------------------
def test_step_cap_is_shared_by_the_attributes():
    """Both attributes pushed hard (sample mode, far from the requested classes): the two equal
    pushes share one step of norm cap (each 1/sqrt 2 of it)."""
    g = guide(_hand_adp(("a", "b")), {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0, 1.0])},
              mode="sample", scale=1e4, classes={"a": 1, "b": 1}, sample_max_step=1.0)
    h = torch.tensor([[-3.0, -3.0]]).view(1, 2, 1, 1)
    step = (g.start([0]).edit(h, Step(0, 10)) - h).flatten()
    # std = 1, so the cap is max_step * ||std|| = sqrt(2)
    assert step.tolist() == pytest.approx([1.0] * 2, rel=1e-4)


# ---- sample guidance, checked -----------------------------------------------------------------
@pytest.fixture
def pipe(tiny_adm):
    sampler = DDIMSampler(tiny_adm, Schedule.from_config(
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}),
        4, eta=1.0)
    return Pipeline(tiny_adm, sampler, {}, SHAPE, torch.device("cpu"))


def _random_adp(pipe):
    torch.manual_seed(3)
    adp = ADP(pipe.net.h_shape, pipe.sampler.timesteps, {"a": ["c0", "c1"]})
    with torch.no_grad():
        adp.weight["a"].normal_(std=0.05)
        adp.dir_a.copy_(adp.weight["a"])
    return adp.eval()


class Spy:
    """Wraps a Guide: records which seeds each batch guide is started for, and its cap."""

    def __init__(self, g, calls):
        self.g, self.calls = g, calls
        start = g.start

        def recording(seeds, round_=0):
            b = start(seeds, round_)
            calls.append((len(seeds), b.cap))
            return b
        g.start = recording


def _sample(pipe, labeller, seeds=(3, 4, 5), calls=None, retries=1, boost=3.0):
    g = guide(_random_adp(pipe), {"a": torch.tensor([0.0, 1.0])}, mode="sample", scale=1e3,
              classes={"a": 1}, first_step=1, sample_max_step=0.2, labeller=labeller,
              check=labeller is not None, sample_retries=retries, retry_boost=boost)
    Spy(g, calls if calls is not None else [])
    x0, _ = sample_seeds(pipe, list(seeds), g)         # float images: every change shows
    return x0, g


def test_check_redraws_only_the_misses_from_their_own_seeds(pipe):
    plain, _ = _sample(pipe, None)
    calls = []
    im, g = _sample(pipe, FixedLabeller({"a": [[0.1, 0.9]] * 3}), calls=calls)
    assert torch.equal(im, plain) and g.summary()["redrawn_by_check"] == 0
    assert calls == [(3, pytest.approx(0.2))]
    miss1 = {"a": [[0.8, 0.2], [0.1, 0.9], [0.1, 0.9]]}
    calls = []
    im, g = _sample(pipe, FixedLabeller(miss1), calls=calls)
    assert g.summary()["redrawn_by_check"] == 1 and torch.equal(im[[1, 2]], plain[[1, 2]])   # hits kept
    assert calls == [(3, pytest.approx(0.2)), (1, pytest.approx(0.6))]     # the miss, cap x3
    assert (im[0] - plain[0]).abs().max() > 1e-2             # the redrawn image is the one kept
                                                             # (round-off of batch 1 vs 3: ~3e-4)
    same, _ = _sample(pipe, FixedLabeller(miss1), boost=1.0)  # redrawn with the same cap:
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-3)   # the same image (same seed,
                                                                    # batch 1 vs 3: round-off only)


def test_check_gives_up_after_its_retries(pipe):
    lab = FixedLabeller({"a": [[0.9, 0.1]] * 3})
    _, g = _sample(pipe, lab, retries=2)
    assert g.summary()["redrawn_by_check"] == 6 and lab.calls == 2


def test_check_in_distribution_mode_counts_for_the_running_balance_only(pipe):
    lab = FixedLabeller({"a": [[0.9, 0.1], [0.2, 0.8]]})
    g = guide(_random_adp(pipe), {"a": torch.tensor([0.5, 0.5])}, labeller=lab, check=True,
              running_balance=True)
    list(sample_batches(pipe, plan_batches([1, 2], 2), g, progress=False))
    assert g.balance.sums["a"].tolist() == [1.0, 1.0] and g.summary()["redrawn_by_check"] is None


def test_count_assigned_carries_the_quotas_classes_and_never_reads_the_images(pipe):
    """count: assigned: the balance holds what each batch's quota asked for (6/2 over four
    batches of 2 for a 75/25 target, whatever the rounding of each batch), not the labeller's
    reading (all class 0 here: 8/0)."""
    lab = FixedLabeller({"a": [[0.9, 0.1]] * 2})
    g = guide(_random_adp(pipe), {"a": torch.tensor([0.75, 0.25])}, labeller=lab, check=True,
              running_balance=True, estimator="quota", count="assigned")
    asked = []
    for _ in sample_batches(pipe, plan_batches(list(range(8)), 2), g, progress=False):
        asked.append(g.balance.sums["a"].tolist())
    assert g.balance.sums["a"].tolist() == [6.0, 2.0] and g.balance.count == 8
    assert asked[1] == [3.0, 1.0] and lab.calls == 0
    assert not g.plan.needs_labeller()
    with pytest.raises(ValueError, match="count: assigned"):
        build_plan({"guidance": {"preset": "ours", "count": "assigned"}}, "distribution",
                   {"parity": "0.5", "magnitude": "0.5"}, ADP_ATTRS)


# ---- the auto estimator -----------------------------------------------------------------------
ADP_ATTRS = {"parity": ["even", "odd"], "magnitude": ["low", "high"]}


def test_auto_estimator_is_quota_for_one_attribute_soft_for_several():
    cfg = {"guidance": {"preset": "ours"}}
    one = build_plan(cfg, "distribution", {"parity": "0.5"}, ADP_ATTRS)
    assert (one.estimator, one.scales["parity"], one.cap) == ("quota", 1000.0, 2.0)
    two = build_plan(cfg, "distribution", {"parity": "0.5", "magnitude": "0.5"}, ADP_ATTRS)
    assert (two.estimator, two.scales["parity"], two.cap) == ("soft", 128.0, 1.0)
    joint = build_plan(cfg, "distribution", {"parity*magnitude": "uniform"}, ADP_ATTRS)
    assert joint.estimator == "soft"
    forced = build_plan(cfg, "distribution", {"parity": "0.5"}, ADP_ATTRS, {"estimator": "soft"})
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


def test_the_plan_guides_through_the_finer_head_but_reports_the_users_targets():
    cfg = {"refine": REFINE, "guidance": {"preset": "ours", "refine_within": "uniform"}}
    g = build_plan(cfg, "distribution", {"parity": "0.8"}, DIGITS, scale_spec="parity=7")
    assert g.requested == {"parity": pytest.approx([0.2, 0.8])}
    assert list(g.targets) == ["digit"] and g.refined == {"digit": ["parity"]}
    assert g.targets["digit"].tolist() == pytest.approx([0.04, 0.16] * 5)
    assert g.scales == {"digit": 7.0} and g.estimator == "quota"
    off = build_plan(cfg, "distribution", {"parity": "0.8"}, DIGITS, {"refine": False})
    assert list(off.targets) == ["parity"] and off.refined is None
    paper = build_plan(cfg, "distribution", {"parity": "0.8"}, DIGITS, {"preset": "paper"})
    assert list(paper.targets) == ["parity"]             # the paper preset does not refine


def test_the_cell_quota_counts_cells_and_leaves_each_sample_its_own_finer_class():
    """Target [0.5, 0.25, 0.25] on three finer classes, cells {0} and {1, 2}: two samples read 1,
    two read 0. The finer quota (1 of each of 1 and 2) turns a 1 into a 2; the cell quota (two per
    cell) leaves both 1s. In a cell a sample torn between 1 and 2 goes to the one with more of the
    target (0.4 against 0.1); earlier batches' counts enter summed by cell."""
    from utils.guidance.estimators import cell_quota_assignment, quota_assignment
    logq = torch.tensor([[0.05, 0.9, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]).log()
    p = torch.tensor([0.5, 0.25, 0.25])
    assert sorted(quota_assignment(logq, p).tolist()) == [0, 0, 1, 2]
    classes, counts = cell_quota_assignment(logq, p, [[0], [1, 2]])
    assert classes.tolist() == [1, 1, 0, 0] and counts.tolist() == [2, 2]
    torn = torch.tensor([[0.1, 0.45, 0.45], [0.9, 0.05, 0.05]]).log()
    classes, _ = cell_quota_assignment(torn, torch.tensor([0.5, 0.4, 0.1]), [[0], [1, 2]])
    assert classes.tolist() == [1, 0]
    _, counts = cell_quota_assignment(logq, p, [[0], [1, 2]], have=torch.tensor([4.0, 0.0, 0.0]), n_have=4)
    assert counts.tolist() == [0, 4]                     # the 4/0 of before made up


def test_the_nested_quota_counts_cells_over_the_run_and_their_finer_classes_within_each():
    """Target [0.2, 0.3, 0.1, 0.4] on four finer classes, cells {0, 1} and {2, 3}. Of 10 samples
    the cells get 5 and 5, shared 2 / 3 and 1 / 4 by the mix within each cell. After earlier
    batches holding 4 of class 0: the run of 14 wants 7 per cell, so the first cell gets 3 and
    the second 7; the first cell's 3 all go to class 1 (class 0 already holds more than its 2.8
    of 7), the second's 7 come as 1.4 / 5.6, rounded to 1 / 6. The finer quota of the same run
    gives the first cell 4: the surplus of class 0 is clipped, not set against class 1."""
    from utils.guidance.estimators import nested_quota_counts, quota_counts
    p, cells = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64), [[0, 1], [2, 3]]
    assert nested_quota_counts(p, cells, 10).tolist() == [2, 3, 1, 4]
    have = torch.tensor([4.0, 0.0, 0.0, 0.0])
    assert nested_quota_counts(p, cells, 10, have, 4).tolist() == [0, 3, 1, 6]
    assert quota_counts(p, 10, have, 4).tolist() == [0, 4, 1, 5]
    # the cells counted on what the images showed (4 of class 0), the finer classes on what the
    # quota asked for (1 of class 0, 3 of class 1): the first cell's 3 come as 7 x 0.4 - 1 = 1.8
    # and 7 x 0.6 - 3 = 1.2, rounded to 2 / 1
    asked = torch.tensor([1.0, 3.0, 0.0, 0.0])
    assert nested_quota_counts(p, cells, 10, have, 4, asked).tolist() == [2, 1, 1, 6]


def test_the_guides_quota_uses_the_plans_cells():
    """The batch guide's quota on the probabilities of the test above: by cell, both 1s stay (the
    counts it asks for: 2, 2, 0); without cells, one of them is asked to be a 2."""
    import dataclasses
    from helpers import plan as hand_plan
    from utils.guidance.guide import Guide
    logits = {"a": torch.tensor([[0.05, 0.9, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05],
                                 [0.9, 0.05, 0.05]]).log()}
    base = hand_plan({"a": torch.tensor([0.5, 0.25, 0.25])}, estimator="quota")
    for cells, want in (({"a": [[0], [1, 2]]}, [2, 2, 0]), (None, [2, 1, 1])):
        b = Guide(dataclasses.replace(base, cells=cells), _hand_adp(("a",)), BETAS, None).start([0, 1, 2, 3])
        b.loss(logits, 0)
        assert b.asked["a"].tolist() == want
    # nested: the cells' 2 and 2, the second cell's shared 1 / 1 by the target's mix within it
    nested = hand_plan({"a": torch.tensor([0.5, 0.25, 0.25])}, estimator="quota", quota_level="nested")
    b = Guide(dataclasses.replace(nested, cells={"a": [[0], [1, 2]]}), _hand_adp(("a",)), BETAS, None).start([0, 1, 2, 3])
    b.loss(logits, 0)
    assert b.asked["a"].tolist() == [2, 1, 1]


def test_the_nested_quota_counts_cells_on_the_images_and_finer_classes_on_what_it_asked_for():
    """Two batches of 4, target [0.5, 0.25, 0.25], cells {0} and {1, 2}. The first batch asks
    for 2 / 1 / 1; the check reads its images as 0, 0, 1, 1. The second batch's cells take 2 and 2
    (the check's 2 / 2 is on target), and cell {1, 2} shares its 2 as 1 / 1, by what the quota
    asked for before (1 / 1). Counted on the check's reading (2 / 0) it would ask for 0 / 2."""
    import dataclasses
    from helpers import plan as hand_plan
    from utils.guidance.guide import Guide
    logits = {"a": torch.tensor([[0.05, 0.9, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05],
                                 [0.9, 0.05, 0.05]]).log()}
    lab = FixedLabeller({"a": [[0.9, 0.05, 0.05]] * 2 + [[0.05, 0.9, 0.05]] * 2})
    base = hand_plan({"a": torch.tensor([0.5, 0.25, 0.25])}, estimator="quota", quota_level="nested",
                     running_balance=True, check=True)
    g = Guide(dataclasses.replace(base, cells={"a": [[0], [1, 2]]}), _hand_adp(("a",)), BETAS, lab)
    first = g.start([0, 1, 2, 3])
    first.loss(logits, 0)
    assert first.asked["a"].tolist() == [2, 1, 1]
    first.after_batch(torch.zeros(4, *SHAPE))
    assert g.balance.sums["a"].tolist() == [2.0, 2.0, 0.0] and g.balance.asked["a"].tolist() == [2.0, 1.0, 1.0]
    second = g.start([4, 5, 6, 7])
    second.loss(logits, 0)
    assert second.asked["a"].tolist() == [2, 1, 1]


def test_the_plan_names_the_quota_cells_of_the_attributes_it_pursues_only():
    from utils.guidance.targets import quota_cells
    assert quota_cells("digit", ["parity", "magnitude"], REFINE, 10) == [[0, 2, 4], [1, 3], [5, 7, 9], [6, 8]]
    prior = [0.01, 0.01, 0.01, 0.01, 0.01, 0.3, 0.02, 0.3, 0.03, 0.3]
    cfg = {"refine": REFINE, "guidance": {"preset": "ours", "quota_level": "cells"}}
    plan = build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS, {"refine_within": "uniform"})
    assert plan.cells == {"digit": [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]}
    kept = build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS, {"refine_within": "preserve"},
                      priors={"digit": prior})
    assert kept.cells == {"digit": [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]}     # kept magnitude is no cell
    nested = {**cfg, "guidance": {"preset": "ours", "quota_level": "nested"}}
    assert build_plan(nested, "distribution", {"parity": "0.5"}, DIGITS,
                      {"refine_within": "uniform"}).cells == {"digit": [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]}
    assert build_plan({**cfg, "guidance": {"preset": "ours"}}, "distribution", {"parity": "0.5"}, DIGITS,
                      {"refine_within": "uniform"}).cells is None


def test_refine_within_the_models_proportions_keeps_each_class_mix():
    """Parity 50/50 with the model's digit fractions as the prior: within the even class each even
    digit keeps its share of the model's evens (the ours default; ``uniform`` spreads evenly)."""
    prior = [0.3, 0.05, 0.2, 0.05, 0.1, 0.05, 0.1, 0.05, 0.1, 0.0]     # evens 0.8, odds 0.2
    out, _ = refine_targets({"parity": torch.tensor([0.5, 0.5])}, REFINE, DIGITS, {"digit": prior})
    want = [0.5 * 0.3 / 0.8, 0.5 * 0.05 / 0.2, 0.5 * 0.2 / 0.8, 0.5 * 0.05 / 0.2, 0.5 * 0.1 / 0.8,
            0.5 * 0.05 / 0.2, 0.5 * 0.1 / 0.8, 0.5 * 0.05 / 0.2, 0.5 * 0.1 / 0.8, 0.0]
    assert out["digit"].tolist() == pytest.approx(want, abs=1e-7)
    cfg = {"refine": REFINE, "guidance": {"preset": "ours"}}
    assert build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS, priors={"digit": prior}).settings.refine_within == "model"
    plan = build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS, priors={"digit": prior})
    assert plan.targets["digit"].tolist() == pytest.approx(want, abs=1e-7)
    with pytest.raises(ValueError, match="priors_from_samples"):
        build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS)


def test_refine_preserve_keeps_the_untargeted_magnitude_of_a_prompt():
    """"a large digit": the model's digits are mostly 5-9 (low magnitude 0.05). Parity 50/50 within
    the model's proportions alone lifts the rare small evens with the evens (low 0.30 here);
    ``preserve`` keeps magnitude at the model's 0.05 and parity at the target, and within each
    parity x magnitude cell the model's own mix (the sd family's ours default)."""
    prior = [0.01, 0.01, 0.01, 0.01, 0.01, 0.3, 0.02, 0.3, 0.03, 0.3]   # even 0.08, low 0.05
    coarse = {"parity": torch.tensor([0.5, 0.5])}
    within, _ = refine_targets(coarse, REFINE, DIGITS, {"digit": prior})
    kept, _ = refine_targets(coarse, REFINE, DIGITS, {"digit": prior}, preserve=True)
    low = [0, 1, 2, 3, 4]
    assert float(within["digit"][low].sum()) == pytest.approx(0.5 * 0.03 / 0.08 + 0.5 * 0.02 / 0.92, abs=1e-6)
    q = kept["digit"].double()
    assert float(q[0::2].sum()) == pytest.approx(0.5, abs=1e-6)             # the target
    assert float(q[low].sum()) == pytest.approx(0.05, abs=1e-6)             # the model's magnitude
    # inside a cell the model's ratios stay: 2 and 4 (even, low) as 1:1, 6 and 8 (even, high) as 2:3
    assert float(q[2] / q[4]) == pytest.approx(1.0, abs=1e-6) and float(q[6] / q[8]) == pytest.approx(2 / 3, abs=1e-6)
    cfg = {"model": {"family": "sd"}, "refine": REFINE, "guidance": {"preset": "ours"}}
    plan = build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS, priors={"digit": prior})
    assert plan.settings.refine_within == "preserve"
    assert plan.targets["digit"].tolist() == pytest.approx(kept["digit"].tolist(), abs=1e-7)
    # nothing to preserve when both coarse attributes are targeted: the same as within
    both = {"parity": torch.tensor([0.5, 0.5]), "magnitude": torch.tensor([0.5, 0.5])}
    a, _ = refine_targets(both, REFINE, DIGITS, {"digit": prior})
    b, _ = refine_targets(both, REFINE, DIGITS, {"digit": prior}, preserve=True)
    assert a["digit"].tolist() == pytest.approx(b["digit"].tolist(), abs=1e-7)


def test_refine_preserve_even_shares_each_cell_evenly_and_keeps_the_marginals():
    """The same "a large digit" prior, whose large evens are 6 and 8 as 2:3: ``preserve_even``
    keeps parity at the target and magnitude at the model's 0.05 as ``preserve`` does, and gives
    6 and 8 the same share (every digit of a parity x magnitude cell alike)."""
    prior = [0.01, 0.01, 0.01, 0.01, 0.01, 0.3, 0.02, 0.3, 0.03, 0.3]
    coarse = {"parity": torch.tensor([0.5, 0.5])}
    out, _ = refine_targets(coarse, REFINE, DIGITS, {"digit": prior}, preserve=True, even=True)
    q = out["digit"].double()
    assert float(q[0::2].sum()) == pytest.approx(0.5, abs=1e-6)
    assert float(q[:5].sum()) == pytest.approx(0.05, abs=1e-6)
    # constant on each cell: {6, 8}, {5, 7, 9}, {0, 2, 4}, {1, 3}
    for cell in ([6, 8], [5, 7, 9], [0, 2, 4], [1, 3]):
        assert q[cell].tolist() == pytest.approx([float(q[cell[0]])] * len(cell), abs=1e-7)
    # and of product form (one factor per parity, one per magnitude): q0 q5 = q6 q1
    assert float(q[0] * q[5]) == pytest.approx(float(q[6] * q[1]), rel=1e-5)
    # both coarse attributes targeted (nothing kept): each targeted cell shared evenly as well
    both = {"parity": torch.tensor([0.5, 0.5]), "magnitude": torch.tensor([0.2, 0.8])}
    b, _ = refine_targets(both, REFINE, DIGITS, {"digit": prior}, preserve=True, even=True)
    assert b["digit"].tolist() == pytest.approx([0.1 / 3, 0.05, 0.1 / 3, 0.05, 0.1 / 3,
                                                 0.4 / 3, 0.2, 0.4 / 3, 0.2, 0.4 / 3], abs=1e-6)
    cfg = {"model": {"family": "sd"}, "refine": REFINE,
           "guidance": {"preset": "ours", "refine_within": "preserve_even"}}
    plan = build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS, priors={"digit": prior})
    assert plan.targets["digit"].tolist() == pytest.approx(out["digit"].tolist(), abs=1e-7)
    with pytest.raises(ValueError, match="priors_from_samples"):
        build_plan(cfg, "distribution", {"parity": "0.5"}, DIGITS)


def test_a_list_of_labellers_averages_their_probabilities():
    """labeller: [A, B] reads each image as the mean of A's and B's probabilities, per attribute
    both have with the same classes; one labeller, or none shared, is refused; the config takes
    such a list and refuses a list of one."""
    from models.judge import Judge
    from models.labellers import MeanLabeller, load_labeller
    from utils.config import RunConfig

    class Fixed(Judge):
        def __init__(self, attributes, probs):
            self.attributes, self.probs, self.calibration = attributes, probs, None

        def predict(self, images):
            return {a: p.expand(len(images), -1) for a, p in self.probs.items()}
    a = Fixed({"parity": ["even", "odd"], "size": ["s", "l"]},
              {"parity": torch.tensor([[0.9, 0.1]]), "size": torch.tensor([[1.0, 0.0]])})
    b = Fixed({"parity": ["even", "odd"], "size": ["l", "s"]},
              {"parity": torch.tensor([[0.3, 0.7]]), "size": torch.tensor([[1.0, 0.0]])})
    m = MeanLabeller([a, b])
    assert list(m.attributes) == ["parity"]                      # size's classes differ in order
    torch.testing.assert_close(m.predict(torch.zeros(3, 1, 4, 4))["parity"], torch.tensor([[0.6, 0.4]] * 3))
    bal = RunningBalance(m)
    bal.update({"parity": [0.5, 0.5]}, 3, torch.zeros(3, 1, 4, 4))
    assert bal.sums["parity"].tolist() == [3.0, 0.0]             # the mean's argmax: even
    with pytest.raises(ValueError, match="two or more"):
        MeanLabeller([a])
    with pytest.raises(ValueError, match="share no attribute"):
        MeanLabeller([a, Fixed({"age": ["y", "o"]}, {"age": torch.tensor([[1.0, 0.0]])})])
    both = load_labeller(["digits_svc", "digits_svc_uniform"])
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    p, q = load_labeller("digits_svc").predict(x), load_labeller("digits_svc_uniform").predict(x)
    torch.testing.assert_close(both.predict(x)["digit"], (p["digit"] + q["digit"]) / 2)
    base = {"model": {"family": "pixart_sigma", "checkpoint": "x"}}
    assert RunConfig.of({**base, "labeller": ["digits_svc", "digits_svc_uniform"]}).labeller == \
        ["digits_svc", "digits_svc_uniform"]
    with pytest.raises(ValueError, match="a list of two or more"):
        RunConfig.of({**base, "labeller": ["digits_svc"]})
