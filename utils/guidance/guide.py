"""The guide: a run's h-space guidance, and the per-batch object the batch loop talks to.

The batch loop uses exactly this interface:

    batch = guide.start(seeds)               # one BatchGuide per batch of seeds
    sampler.sample(..., **batch.hooks())      # edit(h, step) -> h at every step (models.hspace.Step)
    report = batch.after_batch(x0)            # BatchReport: estimate, which images to redraw
    guide.summary()                           # what the run's guide counted (for run.json)

The step at a guided step index i, timestep t (head j of the ADP), for a loss L built from
the ADP's logits (``distribution``: sum_k scale_k L_k over the target keys with the plan's
estimator; ``sample``: each sample's requested class):

    delta_h = -step_factor * beta_t^beta_power * n * sum_a (dL/dlogits_a) @ B_a,j

with B = W_j / std_j (the head's weights in raw h coordinates: the plain gradient dL/dh, the
paper), B = Cov_j(h) W_raw^T (``direction: covariance``, ours: moves h along class-mean
differences, Cov over the ADP's training h) or the same with Cov over the h this run has had at
step i (``direction: batch``, ``RunCovariance``: the prompt's own h, so a direction shared with
another attribute across the training prompts but not within this prompt's images drops out),
n = the number of samples p_hat averages when ``batch_normalise`` (ours; 1 in the paper) and,
when the plan has a cap, each sample's delta_h clipped to cap * g_t * ||std_j(h)||,
g_t = min(abar_t^-1/2, cap_growth) (1 without ``cap_growth``). A v-prediction model's clean-image
estimate moves by sqrt(1 - abar_t) |delta v| where an eps-model's moves by
sqrt((1 - abar_t) / abar_t) |delta eps|, so the same edit of h acts sqrt(abar_t) times as much there:
g_t gives its noisiest steps the room an eps-model's edit has.
The gradient runs through the ADP only, never back through the U-Net.

Classifier-free guidance (``step.n_uncond`` = n: h holds [n unconditional rows; n conditional
rows]) follows the settings' row policy:

  - estimate ``cond`` (ours): the batch estimate and the edit come from the n conditional rows;
    estimate ``both`` (the original SD code): from all 2n rows, each row moved by its own
    gradient (sample mode: always from the conditional rows, a sample's class being per image);
  - edit ``both``: an image's unconditional row gets the same delta h as its conditional row
    (with estimate ``both``: its own); edit ``cond``: the unconditional rows stay unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from models.adp import ADP
from models.hspace import Step
from utils.guidance.estimators import (chi_square, cross_entropy_to, kl_divergence, logit_of, probability_of,
                                       assign_to_quota, cell_quota_assignment, nested_quota_counts, quota_counts,
                                       soft_estimate, with_running_balance)
from utils.guidance.targets import GuidancePlan, joint_attributes


class GuidanceDiverged(ValueError):
    """The guided h became infinite or NaN (a scale far too large for an uncapped step)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class RunCovariance:
    """``direction: batch``: at guided step index i, B_a = Cov_i(h) W_raw,a^T with Cov_i over
    every h the run has had at step i so far (this batch's, the global batch's when distributed,
    and each earlier batch's), centred on their mean. Per step it keeps n, sum h [D] and
    sum_a h (W_raw,a h)^T [D,K] in float64, never D x D. One guide is one prompt's run, so the
    covariance is that prompt's; a run resumed from disk starts the sums again."""

    def __init__(self):
        self.sums: dict[int, dict[str, torch.Tensor]] = {}

    def directions(self, i: int, h: torch.Tensor, weights: dict[str, torch.Tensor],
                   distributed: bool = False, min_samples: int = 2) -> dict[str, torch.Tensor] | None:
        """h [N,D] at step i, weights {attr: W_raw [K,D]} -> {attr: B [K,D]} with this batch's h
        added to step i's sums; None while the sums hold fewer than max(2, min_samples) samples."""
        h64 = h.detach().double()
        batch = {"n": h64.new_tensor([float(len(h64))]), "sum": h64.sum(0)}
        for a, w in weights.items():
            batch[a] = h64.T @ (h64 @ w.to(h64).T)                       # [D, K]
        if distributed and _distributed():
            keys = list(batch)
            flat = torch.cat([batch[k].flatten() for k in keys])
            dist.all_reduce(flat)
            at = 0
            for k in keys:
                batch[k] = flat[at:at + batch[k].numel()].view_as(batch[k])
                at += batch[k].numel()
        have = self.sums.get(i)
        total = batch if have is None else {k: have[k].to(v) + v for k, v in batch.items()}
        self.sums[i] = total
        n = float(total["n"])
        if n < max(2, min_samples):
            return None
        out = {}
        for a, w in weights.items():
            centred = total[a] - torch.outer(total["sum"], w.to(h64) @ total["sum"]) / n
            out[a] = (centred / (n - 1)).T.float()
        return out


class RunningBalance:
    """What the earlier batches of a run produced: per target key, the summed class counts
    (or estimates) of their final samples and how many samples they hold. With it, distribution
    guidance steers the *run* rather than each batch on its own (``with_running_balance``);
    the step stays that of one large batch whose earlier members are already drawn, so a
    deficit left by earlier batches (a batch of 4 that came out 3/1) is made up by later ones.
    With a ``labeller`` (an image classifier with ``predict(images) -> {attr: [N,K] probs}``,
    e.g. the one that labelled the ADP's training data, never the judge) a finished batch's
    classes are counted on its images instead of taken from the guide's estimate."""

    def __init__(self, labeller=None, probability: bool = False):
        self.sums: dict[str, torch.Tensor] = {}
        self.asked: dict[str, torch.Tensor] = {}     # the quota's class counts, summed over the batches
        self.count = 0
        self.labeller = labeller
        self.probability = probability

    def update(self, estimate: dict[str, list[float]], n: int, images: torch.Tensor | None = None,
               distributed: bool = False) -> None:
        """Add a finished batch of n samples (the global batch; its images are this rank's part
        of it when ``distributed``, and the counts are all-reduced)."""
        if self.labeller is not None and images is not None:
            sums = self._count(images, list(estimate))
            if distributed and _distributed():
                on = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
                sums = {k: v.to(on) for k, v in sums.items()}
                for v in sums.values():
                    dist.all_reduce(v)
        else:
            sums = {k: n * torch.tensor(p, dtype=torch.float64) for k, p in estimate.items()}
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0) + v.double().cpu()
        self.count += n

    def _count(self, images: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """Per key, the labeller's class counts [K] on images (a joint key counts cells): each
        image's argmax class, or with ``probability`` its probabilities (the expected count)."""
        with torch.no_grad():
            probs = self.labeller.predict(images.clamp(-1, 1).float().cpu())

        def share(a: str) -> torch.Tensor:
            p = probs[a].double()
            return p if self.probability else torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).double()
        out = {}
        for key in keys:
            parts = joint_attributes(key)
            cells = share(parts[0])
            for a in parts[1:]:
                cells = (cells[:, :, None] * share(a)[:, None, :]).flatten(1)
            out[key] = cells.sum(0)
        return out

    def state(self) -> dict:
        return {"count": self.count, "fractions": {k: (v / max(self.count, 1)).tolist()
                                                   for k, v in self.sums.items()}}


@dataclass
class BatchReport:
    """What a finished batch told: the guide's last-step estimate per key, the indices of the
    images to draw again (from their own seeds) and the guide to draw them with."""
    estimate: dict[str, list[float]] = field(default_factory=dict)
    redraw: list[int] = field(default_factory=list)
    retry: "BatchGuide | None" = None


class Guide:
    """A run's h-space guidance: the plan, the ADP, the running balance and the check.

    :param plan: the resolved targets, scales, estimator and cap (``plan_guidance``).
    :param betas: the model's noise schedule beta_t [T].
    :param labeller: the finished-image check's classifier (when ``plan.settings.check``): the
        running balance counts its classes; sample guidance redraws the images it puts outside
        their requested class, with the cap times retry_boost per round.
    :param distributed: the batch spans the ranks of a torchrun group (estimates all-reduced).
    """

    def __init__(self, plan: GuidancePlan, adp: ADP, betas: torch.Tensor, labeller=None,
                 distributed: bool = False):
        settings = plan.settings
        if settings.direction == "covariance" and not adp.has_directions():
            raise ValueError(
                "this ADP has no guidance directions (an imported classifier of the original code): "
                "the 'ours' preset steps along them. Compute them from an extraction "
                "(python multi_classifier.py --directions_from H_FOLDER --adp ADP.pt --out NEW.pt) "
                "or use --preset paper")
        if labeller is None and plan.needs_labeller():
            raise ValueError("the guidance settings ask for a finished-image check but no labeller "
                             "was given: set 'labeller:' in the config, or pass --no-check")
        self.plan, self.adp, self.betas, self.distributed = plan, adp, betas, distributed
        self.abar = torch.cumprod(1 - betas.double(), 0)
        self.labeller = labeller if settings.check else None
        use_balance = plan.mode == "distribution" and settings.running_balance
        self.balance = (RunningBalance(self.labeller, probability=settings.count == "probability")
                        if use_balance else None)
        self.covariance = RunCovariance() if settings.direction == "batch" else None
        self.attrs = list(dict.fromkeys(a for k in plan.targets for a in joint_attributes(k)))
        self.redrawn = 0

    def start(self, seeds: list[int], round_: int = 0) -> "BatchGuide":
        """The guide of one batch (``round_`` > 0: a redraw of checked misses)."""
        return BatchGuide(self, len(seeds), round_)

    def summary(self) -> dict:
        """For run.json: the running balance's counts, how many images the check redrew."""
        return {"running_balance": self.balance.state() if self.balance is not None else None,
                "redrawn_by_check": self.redrawn if self.plan.mode == "sample" and self.labeller else None}


class BatchGuide:
    """Guidance of one batch: ``edit(h, step)`` at each step, ``after_batch(x0)`` at the end."""

    def __init__(self, guide: Guide, n: int, round_: int = 0):
        self.guide, self.n, self.round = guide, n, round_
        self.batch_total = n                    # samples in the (global) batch
        self.estimate: dict[str, list[float]] = {}
        self.asked: dict[str, torch.Tensor] = {}    # per quota key, its class counts [K] at the last step
        cap = guide.plan.cap
        self.cap = None if cap is None else cap * guide.plan.settings.retry_boost ** round_
        self.classes = ({a: torch.full((n,), c) for a, c in guide.plan.classes.items()}
                        if guide.plan.classes else {})

    def hooks(self) -> dict:
        """Keyword arguments for ``DDIMSampler.sample``."""
        return {"edit_h": self.edit}

    def guided(self, i: int) -> bool:
        settings = self.guide.plan.settings
        return settings.first_step <= i < (settings.last_step if settings.last_step is not None else 10 ** 9)

    # ---- the loss -----------------------------------------------------------------------
    def loss(self, logits: dict[str, torch.Tensor], head: int) -> torch.Tensor:
        """The guidance loss L (a scalar, scales included) from the ADP's logits {attr: [N,K]}
        of its head ``head``."""
        plan, settings = self.guide.plan, self.guide.plan.settings
        q = {a: torch.softmax(lg / settings.temperature, dim=1) for a, lg in logits.items()}
        total = next(iter(logits.values())).new_zeros(())
        for key in plan.targets:
            scale = plan.scales[key]
            if plan.mode == "sample":
                self.estimate[key] = q[key].detach().mean(0).cpu().tolist()
                c = self.classes[key]
                if settings.sample_loss == "xent":
                    part = cross_entropy_to(torch.log_softmax(logits[key] / settings.temperature, dim=1), c)
                elif settings.sample_loss == "logit":
                    part = logit_of(logits[key], c)
                else:
                    part = probability_of(q[key], c)
            elif plan.estimator == "quota":
                part = self._quota_loss(key, self._joint(key, q), head)
            else:
                part = self._soft_loss(key, self._joint(key, q), head)
            total = total + scale * part
        return total

    def _joint(self, key: str, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample prediction [N,K] over a key's classes (outer product for a joint key)."""
        parts = joint_attributes(key)
        out = q[parts[0]]
        for a in parts[1:]:
            out = (out[:, :, None] * q[a][:, None, :]).flatten(1)
        return out

    def _confusion(self, key: str, head: int) -> torch.Tensor:
        """The confusion matrix M_j of head j for a key (Kronecker product over a joint key's
        attributes)."""
        parts = joint_attributes(key)
        m = self.guide.adp.confusion(parts[0], head)
        for a in parts[1:]:
            m = torch.kron(m, self.guide.adp.confusion(a, head))
        return m

    def _soft_loss(self, key: str, probs: torch.Tensor, head: int) -> torch.Tensor:
        """chi-square (or KL) of the (debiased, running-balanced) soft estimate to the key's target."""
        q_sum, self.batch_total = self._global_sum(probs)
        debiased = self._confusion(key, head) if self.guide.plan.settings.debias else None
        p_hat = soft_estimate(q_sum, self.batch_total, debiased)
        self.estimate[key] = p_hat.detach().cpu().tolist()
        bal = self.guide.balance
        if bal is not None:
            p_hat = with_running_balance(p_hat, self.batch_total, bal.sums.get(key), bal.count)
        loss = kl_divergence if self.guide.plan.settings.loss == "kl" else chi_square
        return loss(p_hat, self.guide.plan.targets[key].to(p_hat))

    def _quota_loss(self, key: str, probs: torch.Tensor, head: int) -> torch.Tensor:
        """Quota (ours): the global batch is assigned to classes in the target's counts (minus
        what earlier batches of a running balance already hold); each sample is pulled to its
        class by cross-entropy, divided by n (the step multiplies by n again: a per-sample pull)."""
        logq = torch.log(probs.clamp_min(1e-12))
        every, offset = self._global_rows(logq.detach())
        self.batch_total = len(every)
        bal = self.guide.balance
        have, n_have = (bal.sums[key], bal.count) if bal is not None and key in bal.sums else (None, 0)
        target, cells = self.guide.plan.targets[key], (self.guide.plan.cells or {}).get(key)
        if cells is not None and self.guide.plan.settings.quota_level != "nested":
            assigned, _ = cell_quota_assignment(every, target, cells, have, n_have)
            counts = torch.bincount(assigned.cpu(), minlength=len(target))
        else:
            asked = bal.asked.get(key) if bal is not None else None
            counts = (quota_counts(target, len(every), have, n_have) if cells is None
                      else nested_quota_counts(target, cells, len(every), have, n_have, asked))
            assigned = assign_to_quota(every, counts)
        self.asked[key] = counts
        assigned = assigned[offset:offset + len(logq)]
        debiased = self._confusion(key, head) if self.guide.plan.settings.debias else None
        self.estimate[key] = soft_estimate(every.exp().sum(0), len(every), debiased).cpu().tolist()
        return cross_entropy_to(logq, assigned) / self._n_step()

    def _global_sum(self, probs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum over the batch [K], number of samples), over the global batch of every rank when
        distributed (the other ranks' sums enter as constants: the gradient reaches only this
        rank's samples)."""
        total, n = probs.sum(0), len(probs)
        if self.guide.distributed and _distributed():
            buf = torch.cat([total.detach(), total.new_tensor([n])])
            dist.all_reduce(buf)
            total = total + (buf[:-1] - total.detach())
            n = int(round(float(buf[-1])))
        return total, n

    def _global_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the rows of every rank in rank order, this rank's offset among them)."""
        if not (self.guide.distributed and _distributed()):
            return rows, 0
        parts = [None] * dist.get_world_size()              # local batches may differ by one
        dist.all_gather_object(parts, rows.cpu())
        offset = sum(len(p) for p in parts[:dist.get_rank()])
        return torch.cat(parts).to(rows.device), offset

    def _n_step(self) -> int:
        """The number of samples p_hat averages (global batch + a running balance's earlier
        batches): a batch-normalised step multiplies by it to undo the mean's 1/n."""
        bal = self.guide.balance
        return self.batch_total + (bal.count if bal is not None else 0)

    # ---- the interface --------------------------------------------------------------------
    def edit(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """h_t [N,C,H,W] at ``step`` -> the guided h_t (h itself outside the guided steps); CFG
        rows by the module docstring's policy."""
        n = step.n_uncond
        if n == 0 or len(h) != 2 * n:
            return self._move(h, step.i, step.t)
        settings = self.guide.plan.settings
        if settings.cfg_estimate == "both" and self.guide.plan.mode != "sample":
            new = self._move(h, step.i, step.t)
            return new if settings.cfg_edit == "both" or new is h else torch.cat([h[:n], new[n:]])
        cond = h[n:]
        new_cond = self._move(cond, step.i, step.t)
        if new_cond is cond:
            return h
        uncond = h[:n] + (new_cond - cond) if settings.cfg_edit == "both" else h[:n]
        return torch.cat([uncond, new_cond])

    def _move(self, h: torch.Tensor, i: int, t: float) -> torch.Tensor:
        """The guidance step of the module docstring on every row of h."""
        plan, settings = self.guide.plan, self.guide.plan.settings
        if not self.guided(i) or all(v == 0 for v in plan.scales.values()):
            return h
        adp = self.guide.adp
        head = adp.head_index(t, settings.head_rule)
        with torch.enable_grad():
            logits = {a: v.detach().requires_grad_(True)
                      for a, v in adp.logits_at(h.detach(), head, self.guide.attrs).items()}
            grads = torch.autograd.grad(self.loss(logits, head), list(logits.values()))
        n = self._n_step() if plan.mode == "distribution" and settings.batch_normalise else 1
        beta = float(self.guide.betas[min(int(round(float(t))), len(self.guide.betas) - 1)])
        lam = settings.step_factor * beta ** settings.beta_power * n
        step = torch.zeros(len(h), h[0].numel(), device=h.device)
        bases = self._bases(h, i, head)
        for a, grad in zip(self.guide.attrs, grads):
            step -= lam * grad.float() @ bases[a].to(h.device)
        if self.cap is not None:
            step = clip_rows(step, self.cap * self.cap_factor(t) * float(adp.std[head].norm()))
        new = (h.float() + step.view_as(h)).to(h.dtype)
        if not bool(torch.isfinite(new).all()):
            raise GuidanceDiverged(
                f"guidance diverged at step {i} (t = {float(t):g}): h is no longer finite, so the images "
                f"would be blank; lower --scale (now {plan.scales}) or use a capped preset (--preset ours)")
        return new

    def _bases(self, h: torch.Tensor, i: int, head: int) -> dict[str, torch.Tensor]:
        """B per guided attribute [K,D] (module docstring). ``batch`` before its sums hold
        ``batch_min`` samples: the ADP's stored directions, or its raw weights when it has none."""
        settings = self.guide.plan.settings
        adp, direction = self.guide.adp, settings.direction
        weights = {a: adp.raw_weight(a, head).detach() for a in self.guide.attrs}
        if direction == "batch":
            run = self.guide.covariance.directions(i, h.reshape(len(h), -1), weights, self.guide.distributed,
                                                   settings.batch_min)
            if run is not None:
                return run
            direction = "covariance" if adp.has_directions() else "gradient"
        if direction == "covariance":
            return {a: adp.direction(a, head) for a in self.guide.attrs}
        return weights

    def cap_factor(self, t) -> float:
        """g_t of the module docstring: min(abar_t^-1/2, cap_growth), 1 without cap_growth."""
        growth = self.guide.plan.settings.cap_growth
        if growth is None:
            return 1.0
        abar = float(self.guide.abar[min(int(round(float(t))), len(self.guide.abar) - 1)])
        return min(abar ** -0.5, growth) if abar > 0 else growth

    def after_batch(self, x0: torch.Tensor) -> BatchReport:
        """The batch is finished (images x0 [N,C,H,W] in [-1,1]): add it to the running balance;
        in sample mode with the check, name the images outside their requested class (while
        redraw rounds remain) and give the guide to redraw them with."""
        guide = self.guide
        report = BatchReport(dict(self.estimate))
        if guide.balance is not None and self.estimate:
            for k, c in self.asked.items():
                guide.balance.asked[k] = guide.balance.asked.get(k, 0) + c.double().cpu()
            if guide.plan.settings.count == "assigned":     # what the quota asked for, not the images
                asked = {k: (c.double() / self.batch_total).tolist() for k, c in self.asked.items()}
                guide.balance.update({**self.estimate, **asked}, self.batch_total)
            else:
                guide.balance.update(self.estimate, self.batch_total, x0, guide.distributed)
        retries = guide.plan.settings.sample_retries
        if guide.plan.mode == "sample" and guide.labeller is not None and self.round < retries:
            with torch.no_grad():
                probs = guide.labeller.predict(x0.clamp(-1, 1).float().cpu())
            miss = torch.zeros(len(x0), dtype=torch.bool)
            for a, c in guide.plan.classes.items():
                miss |= probs[a].argmax(1) != c
            report.redraw = miss.nonzero().flatten().tolist()
            guide.redrawn += len(report.redraw)
            if report.redraw:
                report.retry = guide.start(report.redraw, self.round + 1)
        return report


def clip_rows(step: torch.Tensor, cap: float) -> torch.Tensor:
    """Each row of step [N,D] scaled down to norm <= cap."""
    return step * torch.clamp(cap / step.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
