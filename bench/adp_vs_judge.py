"""Where the guide and the judge part ways: per-sample ADP prediction at the last step vs the judge.

    python bench/adp_vs_judge.py --n 200 --runs '[{"name": "soft", "estimator": "soft"},
                                                  {"name": "soft, steps 1:40", "estimator": "soft", "guide_steps": "1:40"}]'

For each distribution-guided run (target parity 50/50 unless given), prints the judge's parity
fractions, the share the ADP's last-step head calls odd (argmax, on the unedited h), the share
of samples on which the two disagree, FD, confident share and Frechet distance. A guide that
"fools" its own classifier shows up as a disagreement well above the ADP's validation error.
Run keys: name, targets, scale, guide_steps and any build_guidance override (estimator,
max_step, commit, beta_power, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffusion_latent import guidance_factory, load_adp_for, load_pipeline, plan_batches, sample_batches  # noqa: E402
from utils.commands import build_guidance  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.evaluate import evaluate_images, judge_from_config, real_reference  # noqa: E402
from utils.runtime import pick_device, setup_logging  # noqa: E402


class LastStepProbe:
    """Wraps a batch's HGuidance: records the ADP's parity argmax on h at the last step."""

    def __init__(self, edit, adp, last_i: int, out: list):
        self.edit, self.adp, self.last_i, self.out = edit, adp, last_i, out
        self.balance = None

    @property
    def last_distribution(self):
        return self.edit.last_distribution

    def __call__(self, h, i, t):
        if i == self.last_i:
            self.out.append(self.adp.logits(h, t, ["parity"])["parity"].argmax(1).cpu())
        return self.edit(h, i, t)


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
        g, cls, tg = build_guidance(cfg, "distribution", targets, adp,
                                    None if scale is None else str(scale), steps, **run)
        make, preds = guidance_factory(pipe, adp, g, cls), []
        t0, imgs = time.time(), []
        for _, im, _ in sample_batches(pipe, plan_batches(list(range(args.n)), args.bs),
                                       lambda b: LastStepProbe(make(b), adp, last_i, preds), desc=name):
            imgs.append(torch.from_numpy(im))
        x = torch.cat(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        rep = evaluate_images(x, judge, tg, real)
        judged = judge.predict(x)["parity"].argmax(1)
        adp_odd = torch.cat(preds)
        fr = rep["attributes"]["parity"]["fractions"]
        print(f"| {name} | {fr[0]:.3f}/{fr[1]:.3f} | {adp_odd.float().mean():.3f} | "
              f"{(judged != adp_odd).float().mean():.3f} | {rep['attributes']['parity'].get('fd', float('nan')):.3f} | "
              f"{rep['confident_share']:.3f} | {rep.get('frechet', float('nan')):.2f} | {time.time() - t0:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
