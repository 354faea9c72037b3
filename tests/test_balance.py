"""Beyond the paper (utils/guidance): running balance across batches, the batch estimate
all-reduced across processes (torch.distributed, gloo), and joint targets over two attributes.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models.hspace import Step

from helpers import BETAS, guide, hand_adp as _hand_adp, step_once
from utils.guidance.guide import RunningBalance

ROOT = Path(__file__).resolve().parent.parent


# ---- running balance --------------------------------------------------------------------------
def test_running_balance_update_and_state():
    b = RunningBalance()
    b.update({"a": [1.0, 0.0]}, 3)
    b.update({"a": [0.0, 1.0]}, 1)
    assert b.count == 4
    assert b.state()["fractions"]["a"] == pytest.approx([0.75, 0.25])


def test_running_balance_makes_up_an_earlier_deficit():
    """A balanced batch (p = 50/50) is not pushed by plain guidance; after earlier batches that
    came out all class 0, the running balance pushes it towards class 1."""
    adp = _hand_adp()
    h = torch.tensor([[-1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1)   # p1 = 0.12, 0.88: mean 0.5
    target = {"a": torch.tensor([0.5, 0.5])}
    plain, _ = step_once(adp, target, h)
    torch.testing.assert_close(plain, h)
    g = guide(adp, target, running_balance=True)
    g.balance.update({"a": [1.0, 0.0]}, 6)             # six earlier samples, all class 0
    out = g.start([0, 1]).edit(h, Step(0, 10))
    assert (out[:, 0] > h[:, 0]).all()                # both samples move towards class 1
    torch.testing.assert_close(out[:, 1], h[:, 1])
    # the push: -(n_prev + N) * dL/dlogit @ E with p_run = (6*[1,0] + 2*[.5,.5]) / 8 = [.875, .125]
    p1 = torch.sigmoid(2 * h[:, 0].flatten())
    dl_dp1 = 2 * (0.125 - 0.5) / 0.5 - 2 * (0.875 - 0.5) / 0.5      # d chi2 / d p1 (p0 = 1 - p1)
    expect = -8 * dl_dp1 / 8 * p1 * (1 - p1) * 2.0 * (BETAS[10] ** 0.05).item()
    torch.testing.assert_close((out - h)[:, 0].flatten(), expect.float(), rtol=1e-4, atol=1e-6)


def test_running_balance_is_only_for_distribution_mode():
    g = guide(_hand_adp(), {"a": torch.tensor([0.0, 1.0])}, mode="sample", classes={"a": 1},
              running_balance=True)
    assert g.balance is None and g.summary()["running_balance"] is None


def test_the_batch_loop_feeds_the_running_balance(tiny_adm):
    """Through the real batch loop: after each batch the balance holds its samples, so the
    second batch is guided against the first one's outcome (disconnecting the update in
    after_batch fails here)."""
    from models.adp import ADP
    from utils.sampling.diffusion import DDIMSampler, Schedule
    from utils.sampling.pipeline import Pipeline, plan_batches, sample_batches
    sampler = DDIMSampler(tiny_adm, Schedule.from_config({"beta_schedule": "linear"}), 3, eta=1.0)
    pipe = Pipeline(tiny_adm, sampler, {}, (1, 16, 16), torch.device("cpu"))
    torch.manual_seed(0)
    adp = ADP(tiny_adm.h_shape, sampler.timesteps, {"a": ["c0", "c1"]})
    with torch.no_grad():
        adp.weight["a"].normal_(std=0.05)
        adp.dir_a.copy_(adp.weight["a"])
    g = guide(adp, {"a": torch.tensor([0.5, 0.5])}, running_balance=True)
    estimates = [e for _, _, e in sample_batches(pipe, plan_batches(list(range(6)), 2), g, progress=False)]
    assert g.balance.count == 6
    want = sum(2 * torch.tensor(e["a"], dtype=torch.float64) for e in estimates)
    torch.testing.assert_close(g.balance.sums["a"], want)


# ---- joint targets ----------------------------------------------------------------------------
def test_joint_prediction_is_the_outer_product_first_attribute_slowest():
    adp = _hand_adp(("a", "b"))
    b = guide(adp, {"a*b": torch.full((4,), 0.25)}).start([0])
    qa, qb = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.3, 0.7]])
    torch.testing.assert_close(b._joint("a*b", {"a": qa, "b": qb}),
                               torch.tensor([[0.27, 0.63, 0.03, 0.07]]))


def test_joint_target_fixes_what_marginals_cannot():
    """Samples (a,b) = (0,0) and (1,1): both marginals are 50/50, so marginal guidance does not
    move them; a uniform joint target moves them so that the empty cells (0,1) and (1,0) gain
    mass and the joint loss falls."""
    adp = _hand_adp(("a", "b"))
    h = torch.tensor([[-1.5, -1.0], [1.5, 1.0]]).view(2, 2, 1, 1)
    marg, _ = step_once(adp, {"a": torch.tensor([.5, .5]), "b": torch.tensor([.5, .5])}, h)
    torch.testing.assert_close(marg, h)
    target = {"a*b": torch.full((4,), 0.25)}
    out, joint = step_once(adp, target, h)
    before = joint.estimate["a*b"]
    assert before[1] + before[2] < 0.3                 # the off-diagonal cells are nearly empty
    _, after = step_once(adp, target, out, scale=1e-9)      # a no-op step, only to record the estimate
    moved = after.estimate["a*b"]
    assert moved[1] + moved[2] > before[1] + before[2] + 0.05
    assert not torch.equal(out, h)


# ---- all-reduce across processes --------------------------------------------------------------
def _rank_step(rank, world, port, h, out_q, estimator, direction):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        adp = _hand_adp()
        part = h.chunk(world)[rank]
        b = guide(adp, {"a": torch.tensor([0.5, 0.5])}, distributed=True, estimator=estimator,
                  direction=direction).start([0] * len(part))
        out_q.put((rank, b.edit(part, Step(0, 10)).numpy(), b.batch_total, b.estimate["a"]))  # by value
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("estimator,direction", [("soft", "covariance"), ("quota", "covariance"),
                                                 ("soft", "batch")])
def test_two_processes_guide_one_global_batch(estimator, direction):
    """2 gloo ranks with half a batch each make exactly the edit one process makes on all of it
    (soft: the batch mean is all-reduced; quota: the assignment sees the whole batch; batch
    directions: the covariance of the whole batch's h)."""
    h = torch.tensor([[-2.0, 0.1], [-1.0, 0.2], [-1.5, 0.3], [0.5, 0.4]]).view(4, 2, 1, 1)
    expect, whole = step_once(_hand_adp(), {"a": torch.tensor([0.5, 0.5])}, h, estimator=estimator,
                              direction=direction)
    if direction == "batch":            # h_1 co-varies with h_0 in this batch: it moves too
        assert (expect - h)[:, 1].abs().gt(1e-4).all()
    if estimator == "quota":      # the two likeliest odd samples (rows 1 and 3) are sent up,
        assert (expect - h)[[1, 3], 0].gt(0).all() and (expect - h)[[0, 2], 0].le(0).all()   # one per rank
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000 + (7 if estimator == "quota" else 0) + (13 if direction == "batch" else 0)
    procs = [ctx.Process(target=_rank_step, args=(r, 2, port, h, q, estimator, direction)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    got = torch.cat([torch.from_numpy(r[1]) for r in res])
    torch.testing.assert_close(got, expect)
    assert [r[2] for r in res] == [4, 4]
    assert res[0][3] == pytest.approx(whole.estimate["a"])


@pytest.mark.slow
@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import torch.distributed.run"],
                                   capture_output=True).returncode != 0, reason="no torchrun")
def test_torchrun_two_ranks_match_one_process(tmp_path):
    """main.py under torchrun (2 gloo ranks x batch 2) writes the same images as one process
    with batch 4, every seed exactly once."""
    common = ["main.py", "--device", "cpu", "--mode", "distribution", "--target", "parity=0.5",
              "--n_test_img", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, *common, "--bs_test", "4", "--exp", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(30500 + os.getpid() % 1000), *common,
                          "--bs_test", "2", "--exp", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    from PIL import Image
    names = sorted(p.name for p in (tmp_path / "two").glob("0*.png"))
    assert names == [f"{s:06d}.png" for s in range(8)]
    for n in names:
        a = np.asarray(Image.open(tmp_path / "one" / n)).astype(int)
        b = np.asarray(Image.open(tmp_path / "two" / n)).astype(int)
        assert np.abs(a - b).max() <= 2, n           # float round-off of batch 2 vs batch 4 only
    import json
    rec = json.loads((tmp_path / "two" / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["seeds"] == list(range(8))
    # each global batch's estimate is recorded under the global batch's seeds, as one process does
    ref = json.loads((tmp_path / "one" / "run.json").read_text())["adp_distribution_last_step"]
    got = rec["adp_distribution_last_step"]
    assert [d["seeds"] for d in got] == [d["seeds"] for d in ref] == [[0, 3], [4, 7]]
    for a, b in zip(got, ref):
        for key in b["adp_distribution"]:
            assert np.allclose(a["adp_distribution"][key], b["adp_distribution"][key], atol=1e-3)


# ---- the batch plan (utils.sampling.pipeline.plan_batches) -------------------------------------------
def test_plan_batches_splits_global_batches_disjoint_and_complete():
    from utils.sampling.pipeline import plan_batches
    seeds = list(range(10))
    plans = [plan_batches(seeds, 2, r, 2) for r in range(2)]
    assert plans[0] == [[0, 1], [4, 5], [8]] and plans[1] == [[2, 3], [6, 7], [9]]
    flat = sorted(s for p in plans for b in p for s in b)
    assert flat == seeds
    assert plan_batches(seeds, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_plan_batches_resume_redoes_whole_global_batches_on_every_rank():
    from utils.sampling.pipeline import plan_batches
    done = {0, 1, 2, 3, 4, 6}                       # batch 0 complete, batch 1 lacks 5 and 7
    assert plan_batches(list(range(8)), 2, 0, 2, done) == [[4, 5]]
    assert plan_batches(list(range(8)), 2, 1, 2, done) == [[6, 7]]


def test_plan_batches_refuses_a_last_batch_smaller_than_the_world():
    from utils.sampling.pipeline import plan_batches
    with pytest.raises(ValueError, match="multiple of 4"):
        plan_batches(list(range(9)), 2, 0, 4)
