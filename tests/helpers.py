"""Small builders shared by the guidance tests: a hand-made ADP and guides on it."""
import torch

from models.adp import ADP
from utils.guidance.guide import Guide
from utils.guidance.settings import resolve_settings
from utils.guidance.targets import GuidancePlan

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


def hand_adp(attrs=("a",)):
    """h_shape (2,1,1), timesteps [10, 0]; attribute 'a': logit_1 - logit_0 = 2 h_0 and (if
    asked) attribute 'b': logit_1 - logit_0 = 2 h_1. mean 0, std 1, identity covariance:
    directions = weights."""
    adp = ADP((2, 1, 1), [10, 0], {a: ["c0", "c1"] for a in attrs})
    with torch.no_grad():
        for k, a in enumerate(attrs):
            w = torch.zeros(2, 2)
            w[0, k], w[1, k] = -1.0, 1.0
            for s in range(2):
                adp.weight[a][s] = w
                getattr(adp, f"dir_{a}")[s] = w
    return adp.eval()


def settings(**over):
    """The 'ours' preset made plain for hand computations: soft estimate, no debias, no
    running balance / check / refine, temperature 1, every step guided, a loose cap."""
    base = dict(preset="ours", estimator="soft", debias=False, running_balance=False, check=False,
                refine=False, temperature=1.0, first_step=0, max_step=100.0, sample_max_step=100.0,
                soft_max_step=None, soft_distribution_scale=None)
    base.update(over)
    return resolve_settings(base)


def plan(targets, mode="distribution", scale=1.0, classes=None, **over):
    """A GuidancePlan on ``targets`` {key: tensor} with one scale for every key."""
    s = settings(**over)
    est = "sample" if mode == "sample" else ("quota" if s.estimator == "quota" else "soft")
    return GuidancePlan(mode, s, targets, {k: v.tolist() for k, v in targets.items()},
                        {k: scale for k in targets}, est, s.cap(est == "soft", mode), classes)


def guide(adp, targets, mode="distribution", scale=1.0, classes=None, labeller=None,
          distributed=False, **over):
    """A run's Guide on a hand-built plan."""
    return Guide(plan(targets, mode, scale, classes, **over), adp, BETAS, labeller, distributed)


def edit(adp, targets, h, i=0, t=10, n=None, **kw):
    """(edited h, the batch guide) for one step of a fresh batch guide."""
    b = guide(adp, targets, **kw).start(list(range(n or len(h))))
    return b.edit(h, i, t), b
