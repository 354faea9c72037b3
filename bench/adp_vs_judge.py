"""Where the guide and the judge part ways: per-sample ADP prediction at the last step vs the judge
(benchmark kind ``adp_vs_judge``).

    python bench/run.py guidance --only adp_vs_judge      # the runs of bench/lists/guidance.yml

For each distribution-guided run (run specs as kind ``guidance``'s: name, targets, guidance
settings by their names), the table gives the judge's parity fractions, the share the ADP's
last-step head calls odd (argmax, on the guided h), the share of samples on which the two
disagree, FD, confident share, Frechet distance and wall seconds. A guide that "fools" its own
classifier shows up as a disagreement well above the ADP's validation error.
"""
from __future__ import annotations

import json
import time

import torch

from bench.guidance_eval import make_plan
from bench.runlist import guidance_overrides
from utils.app.config import load_config
from utils.app.runtime import pick_device
from utils.evaluation.evaluate import evaluate_images, judge_from_config, real_reference
from utils.guidance import build_guide
from utils.sampling.pipeline import load_adp_for, load_pipeline, plan_batches, sample_batches


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


def run_entry(entry, ctx) -> None:
    """Sample each run with the probe, judge it; write the table and the JSON beside it."""
    cfg = load_config(entry["config"])
    pipe = load_pipeline(cfg, pick_device(ctx.device))
    adp = load_adp_for(pipe, entry["adp"] or cfg["adp"])
    judge, real = judge_from_config(cfg), real_reference(cfg)
    last_i = len(pipe.sampler.timesteps) - 1
    seeds = list(range(entry["seed"], entry["seed"] + entry["n"]))
    lines = [f"ADP (last step) against the judge: n={entry['n']} (seeds {seeds[0]}-{seeds[-1]}), batch {entry['bs']}",
             "", "| run | judge parity even/odd | ADP says odd | ADP and judge disagree | FD | confident | "
             "Frechet | wall s |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for run in entry["runs"]:
        plan = make_plan(dict(run, guidance=guidance_overrides(entry, run)), cfg, adp)
        probe = LastStepProbe(build_guide(cfg, plan, adp, pipe.sampler.schedule.betas), adp, last_i)
        t0, imgs = time.time(), []
        for _, im, _ in sample_batches(pipe, plan_batches(seeds, run.get("bs", entry["bs"])), probe, desc=run["name"]):
            imgs.append(torch.from_numpy(im))
        x = torch.cat(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        rep = evaluate_images(x, judge, plan.requested, real)
        adp_odd = torch.cat(probe.preds)
        disagree = float((judge.predict(x)["parity"].argmax(1) != adp_odd).float().mean())
        fr = rep["attributes"]["parity"]["fractions"]
        rows.append({"name": run["name"], "spec": run, "adp_odd": float(adp_odd.float().mean()),
                     "disagree": disagree, "wall_s": time.time() - t0, "report": rep})
        lines.append(f"| {run['name']} | {fr[0]:.3f}/{fr[1]:.3f} | {rows[-1]['adp_odd']:.3f} | {disagree:.3f} | "
                     f"{rep['attributes']['parity'].get('fd', float('nan')):.3f} | {rep['confident_share']:.3f} | "
                     f"{rep.get('frechet', float('nan')):.2f} | {rows[-1]['wall_s']:.0f} |")
        print(lines[-1], flush=True)
    out = ctx.out(entry.output)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.write_text("\n".join(lines) + "\n")
