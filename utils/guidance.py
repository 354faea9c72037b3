"""Guidance in h-space: sample guidance and distribution guidance (Parihar et al. 2024, Sec. 4).

Both are callables ``edit(h, i, t) -> h_edited`` handed to the DDIM sampler; the gradient runs
through the ADP only, never back through the U-Net.

The step (ours; the paper's is a plain h <- h - lambda_t grad_h L): with g = dL/dlogits [N,K]
(autograd through the loss and the softmax only) and E_s = Cov_s(h) W_s^T the ADP's
covariance-preconditioned logit gradients (``ADP.compute_directions``),
    delta_h_i = -lambda_t * N * g_i @ E_s,   lambda_t = scale * beta_t ** beta_power
i.e. a gradient step preconditioned by the covariance of h at that timestep: it moves h along
class-mean differences, which the decoder follows, instead of the raw weight direction, which
it largely ignores (on the digits model the raw gradient moved the odd share by < 4 points at
any scale). N (the batch size, distribution mode) makes the scale independent of batch size,
since p_hat is a batch mean. Each sample's step is clipped to ``max_step`` * ||std_t(h)||, which
bounds the edit and prevents the collapse an over-large step causes (the original's reported
all-black images). ``precondition: none`` gives the plain gradient direction.

Losses. Sample mode: cross-entropy of each sample's head to its requested class. Distribution
mode, per target key (an attribute, or ``a*b`` for a joint target):
  - ``soft`` (the paper): chi-square (or KL / L2) between the batch mean of the ADP's softmax,
    debiased with the per-step confusion matrix, and the target;
  - ``quota`` (ours): the batch is assigned to classes in the target's counts and each sample
    gets the cross-entropy to its assigned class (``HGuidance._quota_loss``).
Beyond the paper: the estimate can include the run's earlier batches (``RunningBalance``) and
the batch can span several processes (``distributed``: all-reduce / all-gather).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.adp import ADP


def distribution_loss(p_hat: torch.Tensor, p_ref: torch.Tensor, kind: str = "chi2") -> torch.Tensor:
    """Distance of the batch estimate p_hat [K] to the target p_ref [K].

    ``chi2``: sum_c (p_hat_c - p_ref_c)^2 / p_ref_c (original CelebA-HQ code; p_ref_c > 0);
    ``kl``: KL(p_hat || p_ref) (original Stable Diffusion code); ``l2``: ||p_hat - p_ref||^2.
    """
    if kind == "chi2":
        return ((p_hat - p_ref) ** 2 / p_ref.clamp_min(1e-6)).sum()
    if kind == "kl":
        return (p_hat * (p_hat.clamp_min(1e-8).log() - p_ref.clamp_min(1e-8).log())).sum()
    if kind == "l2":
        return ((p_hat - p_ref) ** 2).sum()
    raise ValueError(f"unknown distribution loss {kind!r}: use chi2, kl or l2")


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
    """The class per sample [N] that maximises sum_i log q_i,c(i) with exactly counts[c] samples
    in class c (a linear assignment of samples to class slots)."""
    from scipy.optimize import linear_sum_assignment
    slots = torch.repeat_interleave(torch.arange(len(counts)), counts.cpu())
    cost = -logq.detach().double().cpu()[:, slots]                   # [N, N]
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(len(logq), dtype=torch.long)
    out[torch.as_tensor(rows)] = slots[torch.as_tensor(cols)]
    return out.to(logq.device)


def joint_attributes(key: str) -> list[str]:
    """'parity*magnitude' -> ['parity', 'magnitude']; a plain attribute -> [attribute]."""
    return key.split("*")


def refine_targets(targets: dict[str, torch.Tensor], refine: dict,
                   attributes: dict[str, list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Targets on coarse attributes -> the same targets on a finer head that nests them (ours).

    ``refine``: {coarse attribute: {"via": finer attribute, "groups": [[finer class indices of
    coarse class 0], [... of class 1], ...]}}, e.g. parity via digit with groups [[0,2,4,6,8],
    [1,3,5,7,9]]. Every key (plain or joint) whose attributes all refine via the same head is
    replaced by one target on that head: finer class j gets prod_k p_k[cell_k(j)] / n(j), the
    product of the keys' target shares of the cells j lies in, spread evenly over the n(j) finer
    classes of its combined cell. The judge's coarse fractions are then the target's, while the
    guide pulls each moved sample to a finer class (e.g. a particular odd digit) instead of along
    one coarse direction, which keeps the mix within each coarse class (the digits model pushed
    to 'odd' otherwise draws mostly 3s). Returns (new targets, {finer head: coarse keys}); keys
    that cannot be refined are left as they are.
    """
    by_via: dict[str, list[str]] = {}
    for key in targets:
        parts = joint_attributes(key)
        vias = {refine.get(a, {}).get("via") for a in parts}
        if len(vias) == 1 and None not in vias:
            via = vias.pop()
            if via in attributes and via not in targets:
                by_via.setdefault(via, []).append(key)
    out = {k: v for k, v in targets.items() if not any(k in ks for ks in by_via.values())}
    for via, keys in by_via.items():
        n_fine = len(attributes[via])

        def cell(a: str, j: int) -> int | None:
            return next((c for c, g in enumerate(refine[a]["groups"]) if j in g), None)
        want = torch.zeros(n_fine, dtype=torch.float64)
        combined: list[tuple | None] = []
        for j in range(n_fine):
            idx = [[cell(a, j) for a in joint_attributes(key)] for key in keys]
            if any(None in i for i in idx):
                combined.append(None)               # j lies in no group: never a target
                continue
            combined.append(tuple(tuple(i) for i in idx))
            share = 1.0
            for key, cells in zip(keys, idx):
                flat = 0
                for a, c in zip(joint_attributes(key), cells):
                    flat = flat * len(refine[a]["groups"]) + c
                share *= float(targets[key][flat])
            want[j] = share
        for j in range(n_fine):
            if want[j] > 0:
                want[j] /= sum(1 for i in range(n_fine) if combined[i] == combined[j])
        if abs(float(want.sum()) - 1.0) > 1e-6:
            raise ValueError(f"cannot guide {keys} through '{via}': some class with a positive target "
                             f"has no finer class in the config's refine groups; fix the groups or "
                             f"pass --no-refine")
        out[via] = want.float()
    return out, by_via


@dataclass
class GuidanceConfig:
    """What to guide and how hard.

    ``targets``: {key: [K] fractions} (distribution mode) or {attr: [K] one-hot} (sample mode).
    A key is an attribute or, for a joint target, attributes joined by ``*``
    (``parity*magnitude``: K = K_parity * K_magnitude fractions, first attribute slowest).
    """
    mode: str                                   # "distribution" | "sample"
    targets: dict[str, torch.Tensor]
    scales: dict[str, float]
    temperature: float = 8.0
    loss: str = "chi2"
    first_step: int = 1                         # guide steps i in [first_step, last_step)
    last_step: int | None = None
    beta_power: float = 0.05
    max_step: float = 0.5
    precondition: str = "covariance"           # "covariance" | "none"
    debias: bool = False                        # estimate p from M_s^-1 p_hat (ADP.calibrate)
    distributed: bool = False                   # all-reduce the batch estimate across ranks
    commit: float = 0.0                         # weight of the per-sample entropy term (below)
    estimator: str = "soft"                     # "soft" (the paper's batch mean) | "quota" (ours)
    cap_per_attribute: bool = False             # clip each attribute's step on its own (else the sum)
    refined: dict | None = None                 # {finer head: coarse keys} (refine_targets)


class RunningBalance:
    """What the earlier batches of a run produced: per target key, the summed (debiased) ADP
    estimate of their final classes and how many samples they hold. With it, distribution
    guidance steers the *run* rather than each batch on its own:

        p_run = (S_prev + N * p_batch) / (n_prev + N)

    is the loss's estimate, where p_batch is the current batch's estimate at step t and
    (S_prev, n_prev) is frozen. The step stays ``-lambda_t (n_prev + N) g_i E_s``, so every
    sample gets the push it would get as a member of one large batch whose earlier members are
    already drawn: a deficit left by earlier batches (e.g. a batch of 4 that came out 3/1) is
    made up by the next ones, while the push per sample keeps the size of plain guidance. It is
    stable because past samples enter as constants: the only free variables are the current
    batch's h, the loss is the same convex function of p_run, and the step cap bounds each edit.
    """

    def __init__(self, labeller=None):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.labeller = labeller

    def update(self, estimate: dict[str, list[float]], n: int, images: torch.Tensor | None = None,
               distributed: bool = False) -> None:
        """Add a finished batch of n samples whose last-step estimate was ``estimate``. With a
        ``labeller`` (an image classifier with ``predict(images) -> {attr: [N,K] probs}``, e.g.
        the one that labelled the ADP's training data) and the batch's final ``images``, the
        batch's classes are counted on the images instead: what the guide could not see (samples
        its ADP reads as flipped but whose image is not) is then made up by the next batches.
        ``distributed``: the images are this rank's part of a global batch (counts all-reduced)."""
        if self.labeller is not None and images is not None:
            sums = self._count(images, list(estimate))
            if distributed and dist.is_available() and dist.is_initialized():
                on = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
                sums = {k: v.to(on) for k, v in sums.items()}
                for v in sums.values():
                    dist.all_reduce(v)
            for k, v in sums.items():
                self.sums[k] = self.sums.get(k, 0) + v.double().cpu()
            self.count += n
            return
        for k, p in estimate.items():
            self.sums[k] = self.sums.get(k, 0) + n * torch.tensor(p, dtype=torch.float64)
        self.count += n

    def _count(self, images: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """Per key, the labeller's class counts [K] on images (a joint key counts cells)."""
        with torch.no_grad():
            probs = self.labeller.predict(images.clamp(-1, 1).float().cpu())
        out = {}
        for key in keys:
            parts = joint_attributes(key)
            onehot = torch.nn.functional.one_hot(probs[parts[0]].argmax(1), probs[parts[0]].shape[1]).double()
            for a in parts[1:]:
                other = torch.nn.functional.one_hot(probs[a].argmax(1), probs[a].shape[1]).double()
                onehot = (onehot[:, :, None] * other[:, None, :]).flatten(1)
            out[key] = onehot.sum(0)
        return out

    def state(self) -> dict:
        return {"count": self.count, "fractions": {k: (v / max(self.count, 1)).tolist()
                                                   for k, v in self.sums.items()}}


@dataclass
class SampleCheck:
    """Sample guidance, checked (ours): after a batch, ``labeller`` (an image classifier, e.g.
    the one that labelled the ADP's training data; never the judge that measures the result)
    classifies the images, and those outside their requested class are drawn again from their
    own seeds with a longer step cap (``boost`` times, then boost**2, ...; ``retries`` rounds).
    The h-space guide can move its ADP across the class boundary further than the image goes;
    the check catches those samples. ``redrawn`` counts the redrawn images (cost)."""
    labeller: object
    retries: int = 1
    boost: float = 2.0
    redrawn: int = 0

    @classmethod
    def from_config(cls, labeller, guidance: dict, retries: int | None = None,
                    boost: float | None = None) -> "SampleCheck":
        """From a config's ``guidance:`` section (sample_retries, retry_boost), or the overrides."""
        return cls(labeller, int(guidance.get("sample_retries", 1) if retries is None else retries),
                   float(guidance.get("retry_boost", 2.0) if boost is None else boost))


class HGuidance:
    """The edit applied to h_t at each guided step (one instance per batch)."""

    def __init__(self, adp: ADP, cfg: GuidanceConfig, betas: torch.Tensor,
                 balance: RunningBalance | None = None):
        if cfg.debias and cfg.temperature != 1.0:
            raise ValueError("debias=True needs temperature 1 (the ADP is calibrated at tau 1)")
        if cfg.mode not in ("distribution", "sample"):
            raise ValueError(f"guidance mode must be 'distribution' or 'sample', got {cfg.mode!r}")
        if balance is not None and cfg.mode != "distribution":
            raise ValueError("a running balance only applies to distribution guidance")
        self.adp, self.cfg, self.betas, self.balance = adp, cfg, betas, balance
        self.attrs = list(dict.fromkeys(a for k in cfg.targets for a in joint_attributes(k)))
        self.last_distribution: dict[str, list[float]] = {}
        self.last_assignment: dict[str, list[float]] = {}     # quota: assigned class fractions
        self.batch_total = 0                    # samples in the (global) batch
        self.sample_targets: dict[str, torch.Tensor] = {}

    def guided(self, i: int) -> bool:
        last = self.cfg.last_step if self.cfg.last_step is not None else 10 ** 9
        return self.cfg.first_step <= i < last

    def _probs(self, key: str, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample predicted distribution [N,K] over a key's classes (outer product for a
        joint key: the heads' joint prediction)."""
        parts = joint_attributes(key)
        out = q[parts[0]]
        for a in parts[1:]:
            out = (out[:, :, None] * q[a][:, None, :]).flatten(1)
        return out

    def _confusion(self, key: str) -> torch.Tensor:
        """M_s for a key (Kronecker product over a joint key's attributes)."""
        parts = joint_attributes(key)
        m = self.adp.confusion(parts[0], self._s)
        for a in parts[1:]:
            m = torch.kron(m, self.adp.confusion(a, self._s))
        return m

    def _quota_loss(self, key: str, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Quota guidance (ours): the global batch is assigned to classes in the target's
        counts (minus what earlier batches of a running balance already hold) so that the
        assignment keeps each sample's most likely class as far as the counts allow; each
        sample is then pulled to its assigned class by cross-entropy. The batch is the unit,
        as in distribution guidance, but the estimate is a count, so the pushed samples are
        made clear members of their class instead of being left near the boundary."""
        logq = torch.log(probs.clamp_min(1e-12))
        every = logq.detach()
        n_local, offset = len(logq), 0
        if self.cfg.distributed and dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()          # local batches may differ by one
            dist.all_gather_object(parts, every.cpu())
            offset = sum(len(p) for p in parts[:dist.get_rank()])
            every = torch.cat(parts).to(logq.device)
        self.batch_total = len(every)
        have, n_have = None, 0
        if self.balance is not None and key in self.balance.sums:
            have, n_have = self.balance.sums[key], self.balance.count
        counts = quota_counts(target, len(every), have, n_have)
        assigned = assign_to_quota(every, counts)[offset:offset + n_local]
        p_est = every.exp().mean(0)                            # the global batch's estimate
        if self.cfg.debias:
            p_est = torch.linalg.solve(self._confusion(key).to(p_est), p_est)
        self.last_distribution[key] = p_est.cpu().tolist()
        self.last_assignment[key] = (counts.double() / counts.sum()).tolist()
        return -logq.gather(1, assigned[:, None]).sum() / self._n_step()

    def _n_step(self) -> int:
        """p_hat is a mean over this many samples (global batch + earlier batches of a running
        balance): the step multiplies by it to undo the mean's 1/N (see the module doc)."""
        return self.batch_total + (self.balance.count if self.balance is not None else 0)

    def _batch_mean(self, probs: torch.Tensor) -> torch.Tensor:
        """Mean over the batch; over the global batch of every rank when distributed (the other
        ranks' sums enter as constants, so the gradient reaches only this rank's samples)."""
        total, n = probs.sum(0), len(probs)
        if self.cfg.distributed and dist.is_available() and dist.is_initialized():
            buf = torch.cat([total.detach(), total.new_tensor([n])])
            dist.all_reduce(buf)
            total = total + (buf[:-1] - total.detach())
            n = int(round(float(buf[-1])))
        self.batch_total = n
        return total / n

    def loss(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guidance loss L (a scalar) from the ADP's logits {attr: [N,K]}, scales included."""
        q = {a: torch.softmax(lg / self.cfg.temperature, dim=1) for a, lg in logits.items()}
        total = next(iter(logits.values())).new_zeros(())
        for key, target in self.cfg.targets.items():
            if self.cfg.mode == "sample":      # cross-entropy to each sample's requested class
                c = self.sample_targets[key].to(q[key].device)
                self.last_distribution[key] = q[key].detach().mean(0).cpu().tolist()
                logq = torch.log_softmax(logits[key] / self.cfg.temperature, dim=1)
                total = total - self.cfg.scales[key] * logq.gather(1, c[:, None]).sum()
                continue
            probs = self._probs(key, q)
            if self.cfg.estimator == "quota":
                total = total + self.cfg.scales[key] * self._quota_loss(key, probs, target)
                continue
            p_hat = self._batch_mean(probs)
            if self.cfg.debias:
                p_hat = torch.linalg.solve(self._confusion(key).to(p_hat), p_hat)
            self.last_distribution[key] = p_hat.detach().cpu().tolist()
            if self.balance is not None and self.balance.count:
                prev = self.balance.sums[key].to(p_hat) if key in self.balance.sums else 0
                p_hat = (prev + self.batch_total * p_hat) / (self.balance.count + self.batch_total)
            total = total + self.cfg.scales[key] * distribution_loss(
                p_hat, target.to(p_hat), self.cfg.loss)
            if self.cfg.commit:     # entropy of each sample's prediction: pushes samples off the
                ent = sum(-(q[a] * torch.log(q[a].clamp_min(1e-12))).sum()   # class boundary
                          for a in joint_attributes(key))
                total = total + self.cfg.commit * self.cfg.scales[key] * ent / self._n_step()
        return total

    def __call__(self, h: torch.Tensor, i: int, t: int) -> torch.Tensor:
        if not self.guided(i) or all(s == 0 for s in self.cfg.scales.values()):
            return h
        s = self._s = self.adp.step_index(t)
        with torch.enable_grad():
            logits = {a: v.detach().requires_grad_(True)
                      for a, v in self.adp.logits(h.detach(), t, self.attrs).items()}
            grads = torch.autograd.grad(self.loss(logits), list(logits.values()))
        n = self._n_step() if self.cfg.mode == "distribution" else 1
        lam = float(self.betas[t]) ** self.cfg.beta_power
        cap = self.cfg.max_step * float(self.adp.std[s].norm())
        step = torch.zeros(len(h), h[0].numel(), device=h.device)
        for a, g in zip(self.attrs, grads):
            basis = (self.adp.direction(a, s) if self.cfg.precondition == "covariance"
                     else self.adp.raw_weight(a, s))
            part = -lam * n * g.float() @ basis.to(h.device)
            step += _clip_rows(part, cap) if self.cfg.cap_per_attribute else part
        if not self.cfg.cap_per_attribute:
            step = _clip_rows(step, cap)
        return (h.float() + step.view_as(h)).to(h.dtype)


def _clip_rows(step: torch.Tensor, cap: float) -> torch.Tensor:
    """Each row of step [N,D] scaled down to norm <= cap."""
    return step * torch.clamp(cap / step.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
