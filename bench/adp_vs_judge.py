"""Where the guide and the judge part ways: per-sample ADP prediction at the last step vs the judge.

    python bench/adp_vs_judge.py --n 200 --runs '[{"name": "soft", "estimator": "soft"},
                                                  {"name": "soft, steps 1:40", "estimator": "soft", "guide_steps": "1:40"}]'

For each distribution-guided run (target parity 50/50 unless given), prints the judge's parity
fractions, the share the ADP's last-step head calls odd (argmax, on the unedited h), the share
of samples on which the two disagree, FD, confident share and Frechet distance. A guide that
"fools" its own classifier shows up as a disagreement well above the ADP's validation error.
Run keys: name, targets, scale, guide_steps and any guidance setting (utils/guidance/settings.py:
preset, estimator, max_step, beta_power, ...).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from utils.app.config import load_config
from utils.app.runtime import pick_device, setup_logging
from utils.evaluation.evaluate import evaluate_images, judge_from_config, real_reference
from utils.guidance import build_guide, build_plan
from utils.guidance.settings import parse_guide_steps
from utils.sampling.pipeline import load_adp_for, load_pipeline, plan_batches, sample_batches
from utils.app.cli import guarded


class LastStepProbe:
    """Wraps a run's Guide: records the ADP's parity argmax on the guided h at the last step."""

    def __init__(self, guide, adp, last_i: int):
        self.guide, self.adp, self.last_i, self.preds = guide, adp, last_i, []

    def start(self, seeds):
        return _ProbedBatch(self.guide.start(seeds), self)

    def summary(self):
        return self.guide.summary()


class _ProbedBatch:
    def __init__(self, batch, probe: LastStepProbe):
        self.batch, self.probe = batch, probe

    def hooks(self):
        return {"edit_h": self.edit}

    def edit(self, h, step):
        h = self.batch.edit(h, step)
        if step.i == self.probe.last_i:
            self.probe.preds.append(self.probe.adp.logits(h, step.t, ["parity"])["parity"].argmax(1).cpu())
        return h

    def after_batch(self, x0):
        return self.batch.after_batch(x0)


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", required=True, help="JSON list of run specs (see above)")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config)
    pipe = load_pipeline(cfg, pick_device(args.device))
    adp = load_adp_for(pipe, cfg["adp"])
    judge, real = judge_from_config(cfg), real_reference(cfg)
    last_i = len(pipe.sampler.timesteps) - 1
    for run in json.loads(args.runs):
        run = dict(run)
        name, targets = run.pop("name", "run"), run.pop("targets", {"parity": "0.5"})
        scale, steps = run.pop("scale", None), run.pop("guide_steps", None)
        if steps:
            run.update(parse_guide_steps(steps))
        plan = build_plan(cfg, "distribution", targets, adp.attributes, run, None if scale is None else str(scale))
        tg = plan.requested
        probe = LastStepProbe(build_guide(cfg, plan, adp, pipe.sampler.schedule.betas), adp, last_i)
        t0, imgs = time.time(), []
        for _, im, _ in sample_batches(pipe, plan_batches(list(range(args.n)), args.bs), probe, desc=name):
            imgs.append(torch.from_numpy(im))
        x = torch.cat(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        rep = evaluate_images(x, judge, tg, real)
        judged = judge.predict(x)["parity"].argmax(1)
        adp_odd = torch.cat(probe.preds)
        fr = rep["attributes"]["parity"]["fractions"]
        print(f"| {name} | {fr[0]:.3f}/{fr[1]:.3f} | {adp_odd.float().mean():.3f} | "
              f"{(judged != adp_odd).float().mean():.3f} | {rep['attributes']['parity'].get('fd', float('nan')):.3f} | "
              f"{rep['confident_share']:.3f} | {rep.get('frechet', float('nan')):.2f} | {time.time() - t0:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
