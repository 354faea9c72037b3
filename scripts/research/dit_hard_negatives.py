"""Hard negatives for the DiT's ADP: the h of *guided* samples (the h the model continues from,
after the guide's edit, at every step), labelled by the config's labeller on their finished
images, written as an extraction folder that ``multi_classifier.py --data`` reads beside vanilla
extractions (docs/results_dit/large_digit.md: the guide's edits fool the linear heads).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/research/dit_hard_negatives.py \\
        --config configs/digits16_dit.yml --out runs/dit_hn/h_guided --targets 0.5,0.2,0.8 \\
        --per 200 --seed 500000 [--adp PATH] [--rank 0 --world 2] [--verify]

Guidance: the config's (its ``guidance:`` and ``refine:``) with the ADP (``--adp``, else the
config's), built as bench/t2i_eval.py builds a run (``bench.guidance_eval.make_plan`` with the
prompt's priors, ``build_guide(..., labeller=...)``), one guide per (prompt, target) over its
batches (the running balance as in a run). Targets: the share of class 1 (odd) of parity.

Recording: ``GuidedCalls`` records h *before* the guide's edit (``record`` is appended in
``GuidedCalls._edit`` before ``batch.edit``). Here the batch guide is wrapped: its ``edit`` is
called as usual and the conditional rows ``[n_uncond:]`` of what it returns (h itself where it
leaves h unchanged) are recorded: with h_pool none the hook writes exactly that tensor back into
the block's tokens, so it is the h the model continues from. ``--verify`` checks this on the first
batch with a second forward hook on the same module registered after the guide's (PyTorch hands a
later hook the earlier hook's returned output).

Shards: batch k of (prompt, target) j; its ``prompt`` field is tagged ``"<prompt> [guided parity=T]"``
so that the trained ADP's per-prompt priors (``ADP.prompt_prior``, used by refine) stay the vanilla
data's for the real prompts; ``guided_prompt`` / ``guided_target`` hold the parts. meta.json has
the keys of ``extract_t2i_pseudo`` (plus ``guided``). Ranks split the (prompt, target) jobs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.guidance_eval import make_plan
from models.hspace import HSpaceHook
from models.labellers import load_labeller
from utils.app.config import load_config
from utils.config import RunConfig
from utils.data.extract import _save_shard, _write_meta, shard_done
from utils.guidance import build_guide
from utils.sampling.pipeline import load_adp_for
from utils.sampling.text2image import load_t2i

PROMPTS = ["a digit", "a small digit", "a large digit", "a handwritten digit", "a number"]


class RecordingBatch:
    """A batch guide whose edits are passed on unchanged; the conditional rows of the edited h
    (what the hook writes back) are appended to ``record`` at every denoiser call."""

    def __init__(self, batch, record: list):
        self.batch, self.record = batch, record

    def edit(self, h, step):
        new = self.batch.edit(h, step)
        out = h if new is None else new
        self.record.append(out[step.n_uncond:].detach().to("cpu", torch.float16))
        return new


class _Verify:
    """A forward hook on the h module registered after the guide's (monkeypatched
    ``HSpaceHook.__enter__``): it reads h from the output the guide's hook returned."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []
        self._stock = HSpaceHook.__enter__

    def __enter__(self):
        verify, stock = self, self._stock

        def enter(hook):
            out = stock(hook)

            def after(module, args, output):
                o = output[hook.stream] if isinstance(output, tuple) else output
                h = hook.read(o)
                n = len(h) // 2 if hook.images is not None and len(h) == 2 * hook.images else 0
                verify.seen.append(h[n:].detach().to("cpu", torch.float16))
            hook._handles.append(hook.module.register_forward_hook(after))
            return out
        HSpaceHook.__enter__ = enter
        return self

    def __exit__(self, *exc):
        HSpaceHook.__enter__ = self._stock


def jobs_of(prompts, targets, per, bs, seed0):
    """[(job index, prompt, target, [seed batches])]; seeds seed0 + per * j + k."""
    out = []
    for j, (q, t) in enumerate((q, t) for q in prompts for t in targets):
        seeds = list(range(seed0 + per * j, seed0 + per * (j + 1)))
        out.append((j, q, t, [seeds[i:i + bs] for i in range(0, per, bs)]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16_dit.yml")
    p.add_argument("--adp", help="the guide's ADP (default: the config's)")
    p.add_argument("--out", default="runs/dit_hn/h_guided")
    p.add_argument("--prompts", default="|".join(PROMPTS), help="separated by '|'")
    p.add_argument("--targets", default="0.5,0.2,0.8", help="parity targets (share of odd), comma-separated")
    p.add_argument("--per", type=int, default=200, help="images per (prompt, target)")
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--seed", type=int, default=500000)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--pre_out", help="also write the h before the guide's edit (same samples, labels) here")
    p.add_argument("--verify", action="store_true", help="check the recorded h against a later hook (first batch)")
    args = p.parse_args(argv)
    prompts, targets = args.prompts.split("|"), args.targets.split(",")
    last = args.seed + args.per * len(prompts) * len(targets)
    if args.seed < 1000 or (args.seed < 40200 and last > 40000):
        raise ValueError("--seed: keep clear of seeds 0-999 and the sweep seeds 40000-40199")
    cfg = load_config(args.config)
    torch.set_grad_enabled(False)
    pipe = load_t2i(cfg, torch.device("cpu"))
    adp_path = args.adp or cfg["adp"]
    adp = load_adp_for(pipe, adp_path, check_grid=False)
    labeller = load_labeller(cfg["labeller"])
    jobs = jobs_of(prompts, targets, args.per, args.bs, args.seed)
    all_seeds = [s for *_, bb in jobs for b in bb for s in b]
    timesteps = [int(round(t)) for t in pipe.timesteps]
    out = Path(args.out)
    meta = {"model": pipe.model_id, "config": RunConfig.of(cfg).name, "labeller": cfg["labeller"],
            "source": "pseudo", "timesteps": timesteps, "h_shape": list(pipe.h_shape),
            "attributes": labeller.attributes, "shard_size": args.bs, "n": len(all_seeds), "eta": pipe.eta,
            "seeds": all_seeds, "text": {"prompts": prompts, "negative_prompt": None, "cfg": pipe.cfg_scale,
                                         "steps": pipe.steps, "scheduler": type(pipe.pipe.scheduler).__name__},
            "guided": {"adp": str(adp_path), "targets": {"parity": targets}, "per": args.per,
                       "h": "after the guide's edit (conditional rows)",
                       "shard_prompt": "'<prompt> [guided parity=<target>]'"}}
    _write_meta(out, meta)
    pre_out = Path(args.pre_out) if args.pre_out else None
    if pre_out is not None:
        _write_meta(pre_out, {**meta, "guided": {**meta["guided"], "h": "before the guide's edit (conditional rows)"}})
    verified = not args.verify
    log = []
    for j, q, t, batches in jobs[args.rank::args.world]:
        run = dict(name=f"hn {q} parity={t}", mode="distribution", targets={"parity": t})
        plan = make_plan(run, cfg, adp, q)
        guide = build_guide(cfg, plan, adp, pipe.betas, labeller=labeller)
        qpipe = pipe.with_prompt(q)
        tag = f"{q} [guided parity={t}]"
        for b, seeds in enumerate(batches):
            k = j * len(batches) + b
            if shard_done(out, k, seeds, meta, tag):
                continue
            t0 = time.time()
            record: list[torch.Tensor] = []
            pre: list[torch.Tensor] | None = [] if pre_out is not None else None
            batch = guide.start(seeds)
            if not verified:
                with _Verify() as v:
                    x0 = qpipe.draw(seeds, RecordingBatch(batch, record), record=pre)
                diff = max(float((a.float() - c.float()).abs().max()) for a, c in zip(record, v.seen))
                print(f"verify: {len(record)} recorded, {len(v.seen)} seen by the later hook, max |diff| {diff:.3g}",
                      flush=True)
                if len(v.seen) != len(record) or diff > 0:
                    raise RuntimeError("the recorded h is not the h the model continues from")
                verified = True
            else:
                x0 = qpipe.draw(seeds, RecordingBatch(batch, record), record=pre)
            report = batch.after_batch(x0)
            if report.redraw:
                raise RuntimeError("a redraw (sample mode) would desynchronise h and images")
            if len(record) != len(timesteps):
                raise RuntimeError(f"recorded h at {len(record)} calls for {len(timesteps)} timesteps")
            probs = labeller.predict(x0)
            labels = {a: pr.argmax(1) for a, pr in probs.items()}
            _save_shard(out, k, {"h": torch.stack(record, 1), "ids": list(seeds), "prompt": tag,
                                 "guided_prompt": q, "guided_target": t,
                                 "labels": labels, "probs": {a: pr.float() for a, pr in probs.items()}})
            if pre_out is not None:
                _save_shard(pre_out, k, {"h": torch.stack(pre, 1), "ids": list(seeds), "prompt": tag,
                                         "guided_prompt": q, "guided_target": t, "labels": labels,
                                         "probs": {a: pr.float() for a, pr in probs.items()}})
            d = torch.bincount(labels["digit"], minlength=10).tolist()
            row = {"shard": k, "prompt": q, "target": t, "n": len(seeds), "odd": float(labels["parity"].float().mean()),
                   "digits": d, "adp_estimate": {a: [round(float(x), 3) for x in v] for a, v in (report.estimate or {}).items()}, "s": round(time.time() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    (out / f"log_rank{args.rank}.json").write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
