"""The batch estimates and losses of h-space guidance, each a small function.

Notation: q_i = softmax(logits_i / tau) [N,K] the ADP's per-sample prediction, p [K] the target,
M_s [K,K] the ADP's confusion matrix at step s (column c: mean prediction for true class c).
"""
from __future__ import annotations

import torch


def chi_square(p_hat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """L = sum_k (p_hat_k - p_k)^2 / p_k (the original CelebA-HQ code's distribution loss)."""
    return ((p_hat - p) ** 2 / p.clamp_min(1e-6)).sum()


def kl_divergence(p_hat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """L = KL(p_hat || p) = sum_k p_hat_k log(p_hat_k / p_k) (the original Stable Diffusion code's
    distribution loss; >= 0, 0 at p_hat = p)."""
    p_hat = p_hat.clamp_min(1e-12)
    return (p_hat * (p_hat.log() - p.clamp_min(1e-12).log())).sum()


def soft_estimate(q_sum: torch.Tensor, n: int, confusion: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's estimate p_hat = (1/N) sum_i q_i from the batch sum of q [K] over N samples;
    debiased (ours): M_s^-1 p_hat, since E[p_hat] = M_s p_true (as CLEAM corrects a
    classifier's counts with its confusion matrix)."""
    p_hat = q_sum / n
    return p_hat if confusion is None else debias(p_hat, confusion)


def debias(p_hat: torch.Tensor, confusion: torch.Tensor) -> torch.Tensor:
    """M_s^-1 p_hat (differentiable in p_hat)."""
    return torch.linalg.solve(confusion.to(p_hat), p_hat)


def with_running_balance(p_hat: torch.Tensor, n: int, prev_sum: torch.Tensor | None,
                         n_prev: int) -> torch.Tensor:
    """p_run = (S_prev + n p_hat) / (n_prev + n): the run's estimate when its earlier batches
    (n_prev samples whose class counts sum to S_prev, constants) are counted with this one."""
    if not n_prev or prev_sum is None:
        return p_hat
    return (prev_sum.to(p_hat) + n * p_hat) / (n_prev + n)


def quota_counts(p: torch.Tensor, n: int, have: torch.Tensor | None = None,
                 n_have: int = 0) -> torch.Tensor:
    """Class counts [K] for the next n samples so that, with ``have`` [K] (the counts already
    drawn, n_have in all), the totals come as close as possible to (n_have + n) * p:
    the deficits, clipped at 0, shared out by largest remainder."""
    want = (n_have + n) * p.double() - (have.double() if have is not None else 0)
    want = want.clamp_min(0)
    want = want / want.sum() * n if want.sum() > 0 else p.double() * n
    counts = want.floor()
    rest = int(n - counts.sum())
    if rest > 0:
        counts[torch.argsort(want - counts, descending=True)[:rest]] += 1
    return counts.long()


def assign_to_quota(logq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The class per sample [N] that maximises sum_i log q_i,c(i) with exactly counts[c]
    samples in class c (a linear assignment of samples to class slots)."""
    from scipy.optimize import linear_sum_assignment
    slots = torch.repeat_interleave(torch.arange(len(counts)), counts.cpu())
    cost = -logq.detach().double().cpu()[:, slots]                   # [N, N]
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(len(logq), dtype=torch.long)
    out[torch.as_tensor(rows)] = slots[torch.as_tensor(cols)]
    return out.to(logq.device)


def quota_assignment(logq: torch.Tensor, p: torch.Tensor, have: torch.Tensor | None = None,
                     n_have: int = 0) -> torch.Tensor:
    """Ours: the class of each of the N samples [N] such that the counts are those of the target
    (``quota_counts``, after the ``have`` counts of earlier batches) and sum_i log q_i,c(i) is
    the largest possible (``assign_to_quota``)."""
    return assign_to_quota(logq, quota_counts(p, len(logq), have, n_have))


def cell_quota_assignment(logq: torch.Tensor, p: torch.Tensor, cells: list[list[int]],
                          have: torch.Tensor | None = None, n_have: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The quota over cells of finer classes (ours, ``quota_level: cells``): the counts [C] are
    those of the target's cell masses P_c = sum_{j in c} p_j (``quota_counts``, after ``have``
    summed by cell); samples are assigned to cells maximising sum_i s_i,c(i), with
    s_i,c = max_{j in c} log q_i,j + log(p_j / P_c), and each goes to the finer class j of its
    cell that attains that maximum. Returns (finer class per sample [N], the cell counts [C])."""
    logq = logq.detach()
    member = torch.zeros(len(cells), logq.shape[1], dtype=torch.bool)
    for c, idx in enumerate(cells):
        member[c, idx] = True
    p = p.double().cpu()
    mass = (member.double() * p).sum(1)                                               # P_c [C]
    within = torch.where(member, (p / mass.clamp_min(1e-12)[:, None]).clamp_min(1e-12).log(),
                         torch.tensor(float("-inf"), dtype=torch.float64))             # [C,K]
    score = logq.double().cpu()[:, None, :] + within[None]                            # [N,C,K]
    best, finer = score.max(2)                                                        # [N,C]
    have_c = None if have is None else (member.double() * have.double().cpu()).sum(1)
    counts = quota_counts(mass, len(logq), have_c, n_have)
    cell = assign_to_quota(best.clamp_min(-1e6), counts)
    return finer.gather(1, cell.cpu()[:, None])[:, 0].to(logq.device), counts


def nested_quota_counts(p: torch.Tensor, cells: list[list[int]], n: int, have: torch.Tensor | None = None,
                        n_have: int = 0, within_have: torch.Tensor | None = None) -> torch.Tensor:
    """Finer class counts [K] for the next n samples, nested in cells (ours, ``quota_level:
    nested``): the cells' counts close the run's deficits of the cell masses P_c = sum_{j in c} p_j
    (``quota_counts`` on ``have`` summed by cell), then each cell's count is shared among its
    finer classes so that, with ``within_have`` [K] (what earlier batches gave each finer class;
    default ``have``), they come as close as possible to the cell's mix p_j / P_c. The cells'
    totals answer to ``have`` alone: a run can count its cells on its images and its finer
    classes on what it asked for."""
    p = p.double().cpu()
    have = None if have is None else have.double().cpu()
    within_have = have if within_have is None else within_have.double().cpu()
    mass = torch.stack([p[idx].sum() for idx in cells])
    have_c = None if have is None else torch.stack([have[idx].sum() for idx in cells])
    per_cell = quota_counts(mass, n, have_c, n_have)
    counts = torch.zeros(len(p), dtype=torch.long)
    for c, idx in enumerate(cells):
        if per_cell[c] == 0:
            continue
        share = p[idx] / mass[c] if mass[c] > 0 else torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64)
        held = None if within_have is None else within_have[idx]
        counts[idx] = quota_counts(share, int(per_cell[c]), held, 0 if held is None else float(held.sum()))
    return counts


def cross_entropy_to(logq: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """L = -sum_i log q_i[c_i]: the quota estimator's pull of each sample to its assigned
    class, and ours for sample guidance."""
    return -logq.gather(1, classes.to(logq.device)[:, None]).sum()


def logit_of(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """L = -sum_i logits_i[c_i]: the original Stable Diffusion code's sample-guidance loss (raw
    logits: its gradient is the class's weight row, the same for every sample)."""
    return -logits.gather(1, classes.to(logits.device)[:, None]).sum()


def probability_of(q: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """L = -sum_i q_i[c_i]: the original's sample-guidance loss."""
    return -q.gather(1, classes.to(q.device)[:, None]).sum()
