"""Judge-measured comparison of sampling modes on the embedded default (same seeds for all runs).

    python bench/guidance_eval.py --preset acceptance --n 1000 --bs 100     # the issue's figures
    python bench/guidance_eval.py --preset preservation --n 1000 --seed 5000   # drift (seeds 5000-5999)
    python bench/guidance_eval.py --preset sweep --n 500                     # scale / step grid
    python bench/guidance_eval.py --preset speed --n 200                     # guided / vanilla time
    python bench/guidance_eval.py --preset balance --n 1000                  # batch 4, joint target
    torchrun --nproc_per_node 2 bench/guidance_eval.py --preset distributed --images 1000 --bs 50

Prints a Markdown table (FD per attribute with bootstrap CI, raw and corrected for the judge's
confusion, joint FD, feature-space Frechet distance to held-out real digits,
confident-recognition share, seconds) and writes it, with the raw numbers as JSON, to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from utils.app.config import load_config
from utils.app.runtime import init_distributed, setup_logging
from utils.evaluation.evaluate import (evaluate_images, fd_cell, fractions_cell, judge_from_config,
                                       real_reference, real_reference_labels)
from utils.guidance import build_guide, build_plan
from utils.guidance.settings import parse_guide_steps
from utils.guidance.targets import joint_classes, parse_fraction_vector
from utils.sampling.pipeline import load_adp_for, load_pipeline, plan_batches, sample_batches
from utils.app.cli import guarded


def presets(name: str, cfg: dict, scales=(0.5, 1, 2, 4, 8, 16), max_steps=(0.25, 0.5, 1.0)) -> list[dict]:
    """Run specs: name, mode, targets {attr: spec}, optional scale / max_step / first_step."""
    if name == "acceptance":
        return [dict(name="vanilla", mode="vanilla", eval={"parity": "0.5", "magnitude": "0.5", "digit": "uniform"},
                     match={"parity*magnitude": "0.6:0.2:0.1:0.1"}),   # Frechet (matched): the training mix
                dict(name="dist parity 50/50, paper preset (the original's method)", mode="distribution",
                     targets={"parity": "0.5"}, preset="paper"),
                dict(name="dist parity 50/50", mode="distribution", targets={"parity": "0.5"}),
                dict(name="dist parity 20/80 (even/odd)", mode="distribution", targets={"parity": "0.8"}),
                dict(name="dist parity+magnitude 50/50", mode="distribution",
                     targets={"parity": "0.5", "magnitude": "0.5"}),
                dict(name="dist digit uniform", mode="distribution", targets={"digit": "uniform"}),
                dict(name="sample parity=odd", mode="sample", targets={"parity": "1"}),
                dict(name="sample parity=even", mode="sample", targets={"parity": "0"})]
    if name == "preservation":     # what the targets leave out: drift from each cell's own mix
        return [dict(name="vanilla", mode="vanilla", eval={"parity": "0.5"}),
                dict(name="dist parity 50/50", mode="distribution", targets={"parity": "0.5"}),
                dict(name="dist parity 50/50, no refine", mode="distribution", targets={"parity": "0.5"},
                     refine=False),
                dict(name="dist parity 50/50, paper preset", mode="distribution", targets={"parity": "0.5"},
                     preset="paper"),
                dict(name="dist parity 20/80 (even/odd)", mode="distribution", targets={"parity": "0.8"}),
                dict(name="dist magnitude 50/50", mode="distribution", targets={"magnitude": "0.5"})]
    if name == "sweep":
        runs = [dict(name="vanilla", mode="vanilla", eval={"parity": "0.5"})]
        for ms in max_steps:
            for sc in scales:
                runs.append(dict(name=f"dist s={sc} max={ms}", mode="distribution",
                                 targets={"parity": "0.5"}, scale=sc, max_step=ms))
        return runs
    if name == "sample":
        return [dict(name="sample parity=odd", mode="sample", targets={"parity": "1"}),
                dict(name="sample parity=even", mode="sample", targets={"parity": "0"})]
    if name == "balance":      # beyond the paper: small batches, joint targets (issue #6)
        return [dict(name="dist parity 50/50, batch 4, paper preset", mode="distribution",
                     targets={"parity": "0.5"}, bs=4, preset="paper"),
                dict(name="dist parity 50/50, batch 4, ours (quota, per batch)", mode="distribution",
                     targets={"parity": "0.5"}, bs=4, estimator="quota", running=False),
                dict(name="dist parity 50/50, batch 4, ours (quota + running balance)", mode="distribution",
                     targets={"parity": "0.5"}, bs=4, estimator="quota", running=True),
                dict(name="dist parity+magnitude 50/50 (marginals)", mode="distribution",
                     targets={"parity": "0.5", "magnitude": "0.5"}),
                dict(name="dist parity*magnitude uniform (joint)", mode="distribution",
                     targets={"parity*magnitude": "uniform"})]
    if name == "distributed":  # run under torchrun; compare with 1 process x 100 (preset speed)
        return [dict(name="dist parity 50/50, global batch all-reduced", mode="distribution",
                     targets={"parity": "0.5"}),
                dict(name="dist parity 50/50, each rank on its own (no all-reduce)", mode="distribution",
                     targets={"parity": "0.5"}, local=True)]
    if name == "speed":
        return [dict(name="vanilla", mode="vanilla", eval={"parity": "0.5"}),
                dict(name="dist parity 50/50, paper preset", mode="distribution",
                     targets={"parity": "0.5"}, preset="paper"),
                dict(name="dist parity 50/50", mode="distribution", targets={"parity": "0.5"}),
                dict(name="vanilla (again)", mode="vanilla", eval={"parity": "0.5"})]
    raise ValueError(f"unknown preset {name!r}")


#: run-spec keys -> guidance settings (utils/guidance/settings.py)
SETTING_KEYS = {"preset": "preset", "estimator": "estimator", "running": "running_balance",
                "refine": "refine", "within": "refine_within", "check": "check", "max_step": "max_step",
                "temperature": "temperature", "retries": "sample_retries", "boost": "retry_boost",
                "cfg_edit": "cfg_edit", "cfg_estimate": "cfg_estimate"}      # the last two: text-to-image
RUN_KEYS = {"name", "mode", "targets", "eval", "match", "scale", "guide_steps", "bs", "local"} | set(SETTING_KEYS)


def make_plan(run: dict, cfg: dict, adp, prompt: str | None = None):
    """The run spec's guidance plan: the config's settings with the spec's overrides (a
    text-to-image ``prompt``: refined within that prompt's class fractions)."""
    unknown = sorted(set(run) - RUN_KEYS)
    if unknown:
        raise ValueError(f"run {run.get('name')!r}: unknown key(s) {unknown}; allowed: {sorted(RUN_KEYS)}")
    over = {v: run.get(k) for k, v in SETTING_KEYS.items()}
    if run.get("guide_steps"):
        over.update(parse_guide_steps(run["guide_steps"]))
    return build_plan(cfg, run["mode"], run["targets"], adp.attributes, over,
                      None if "scale" not in run else str(run["scale"]), adp.priors(prompt))


def run_one(pipe, adp, cfg, run, seeds, bs, judge, real, asymmetric=False, rank=0, world=1,
            real_labels=None, labeller=None, vanilla_probs=None) -> dict | None:
    """Sample one run (this rank's share), judge it on rank 0; returns the report (None off rank 0)."""
    targets = {a: parse_fraction_vector(a, v, judge.attributes[a]).tolist() for a, v in run.get("eval", {}).items()}
    guide, plan = None, None
    if run["mode"] != "vanilla":
        plan = make_plan(run, cfg, adp, getattr(pipe, "prompt", None))
        targets = plan.requested
        guide = build_guide(cfg, plan, adp, pipe.betas,
                            distributed=world > 1 and not run.get("local"), labeller=labeller)
    bs = run.get("bs", bs)
    _sync(pipe, world)
    t0 = time.time()
    imgs, adp_last, mine = [], [], []
    for b, im, dist_ in sample_batches(pipe, plan_batches(seeds, bs, rank, world), guide, asymmetric,
                                       run["name"], progress=rank == 0):
        imgs.append(torch.from_numpy(im))
        mine += b
        if dist_:
            adp_last.append(dist_)
    _sync(pipe, world)
    wall = time.time() - t0
    x = torch.cat(imgs)
    if world > 1:             # every rank's images (and seeds) to rank 0, for the judge
        parts = [None] * world if rank == 0 else None
        torch.distributed.gather_object((mine, x.numpy()), parts, dst=0)
        if rank != 0:
            return None
        got = {s: im for seeds_r, ims in parts for s, im in zip(seeds_r, ims)}
        if sorted(got) != sorted(seeds):
            raise RuntimeError("the ranks' seeds are not disjoint and complete")
        x = torch.from_numpy(np.stack([got[s] for s in seeds]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    match = {a: parse_fraction_vector(a, v, joint_classes(a, judge.attributes)).tolist()
             for a, v in run["match"].items()} if "match" in run else None
    rep = evaluate_images(x, judge, targets, real, real_labels=real_labels, match=match,
                          vanilla_probs=vanilla_probs if run["mode"] == "distribution" else None)
    if run["mode"] == "vanilla":
        rep["_probs"] = judge.predict(x)        # the reference of the drift of later rows (not saved)
    rep.update(name=run["name"], wall_s=round(wall, 2), spec=run)
    if adp_last:     # the guide's own (debiased) estimate at the last step, averaged over batches
        rep["adp_last_step"] = {a: torch.tensor([d[a] for d in adp_last]).mean(0).tolist() for a in adp_last[0]}
    summary = guide.summary() if guide is not None else {}
    if summary.get("running_balance"):
        rep["running_balance"] = summary["running_balance"]
    rep["world_size"] = world
    if summary.get("redrawn_by_check") is not None:
        rep["redrawn"] = summary["redrawn_by_check"]
    if plan is not None:
        rep["guidance"] = plan.to_dict()
    if run["mode"] == "sample":
        a, c = next(iter(plan.classes.items()))
        m = rep["attributes"][a]
        rep["requested_class_share"] = m["fractions"][c]
        rep["requested_class_share_corrected"] = (m["fractions_corrected"][c]
                                                  if m.get("fractions_corrected") is not None else None)
    return rep


def _sync(pipe, world: int) -> None:
    """Wait for queued GPU work and (under torchrun) for the other ranks, before timing."""
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    if world > 1:
        torch.distributed.barrier()


def table(reports: list[dict]) -> str:
    head = ("| run | attribute fractions (judge; corr. = corrected for its confusion) | FD [95% CI] | "
            "corrected FD [95% CI] | joint FD | drift of what was not targeted [95% CI] | "
            "Frechet (to real reweighted to the target) | confident | s/img |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        at = r["attributes"]
        fr = "; ".join(f"{a} {fractions_cell(m)}" for a, m in at.items() if a != "digit" or "fd" in m)
        fd = "; ".join(f"{a} {fd_cell(m)}" for a, m in at.items() if "fd" in m)
        fd_c = "; ".join(f"{a} {fd_cell(m, 'fd_corrected')}" for a, m in at.items()
                         if m.get("fd_corrected") is not None) or "-"
        if "requested_class_share" in r:
            fd = f"in requested class: {r['requested_class_share']:.3f}"
            share_c = r.get("requested_class_share_corrected")
            fd_c = "-" if share_c is None else f"in requested class: {share_c:.3f}"
        joint = f"{r['joint']['fd']:.3f}" if "fd" in r.get("joint", {}) else "-"
        for key, m in r.get("joint_targets", {}).items():
            joint = f"{m['fd']:.3f}"
            fr += f"; {key} " + "/".join(f"{v:.3f}" for v in m["fractions"])
        if "adp_last_step" in r:
            fr += " (ADP: " + "; ".join(f"{a} " + "/".join(f"{v:.2f}" for v in p)
                                       for a, p in r["adp_last_step"].items()) + ")"
        fr_d = f"{r.get('frechet', float('nan')):.2f}"
        if "frechet_matched" in r:
            fr_d += f" ({r['frechet_matched']:.2f})"
        drift = "; ".join(f"{b} {m['drift']:.3f} [{m['drift_ci'][0]:.3f}, {m['drift_ci'][1]:.3f}]"
                          for b, m in r.get("drift", {}).items()) or "-"
        lines.append(f"| {r['name']} | {fr} | {fd} | {fd_c} | {joint} | {drift} | {fr_d} | "
                     f"{r['confident_share']:.3f} | {r['wall_s'] / r['n']:.4f} |")
    return "\n".join(lines)


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    p.add_argument("--adp", help="ADP checkpoint (default: config adp)")
    p.add_argument("--preset", default="acceptance",
                   choices=["acceptance", "preservation", "sweep", "speed", "sample", "balance", "distributed"])
    p.add_argument("--n", "--images", dest="n", type=int, default=1000, help="images per run (--images under torchrun)")
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="first seed (run k of every row uses seed + k)")
    p.add_argument("--device", default="auto")
    p.add_argument("--asymmetric", action="store_true")
    p.add_argument("--out", default="runs/bench_guidance")
    p.add_argument("--scales", default="0.5,1,2,4,8,16", help="(sweep) guidance scales")
    p.add_argument("--max_steps", default="0.25,0.5,1.0", help="(sweep) step caps")
    p.add_argument("--temperature", type=float, help="override the config's ADP softmax temperature")
    p.add_argument("--runs", help="JSON list of run specs replacing the preset's, e.g. "
                   "'[{\"name\": \"q\", \"mode\": \"distribution\", \"targets\": {\"parity\": \"0.5\"}, "
                   "\"estimator\": \"quota\", \"running\": true}]' (keys: bs, scale, guide_steps, local, and the "
                   "guidance settings preset, estimator, running, refine, check, max_step, temperature, retries, boost)")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config)
    rank, world, device = init_distributed(args.device)   # torchrun: one rank per process
    pipe = load_pipeline(cfg, device)
    adp = load_adp_for(pipe, args.adp or cfg["adp"])
    judge, real, real_labels = judge_from_config(cfg), real_reference(cfg), real_reference_labels(cfg)
    labeller = None
    if cfg.get("labeller"):              # loaded once, shared by the runs that check their images
        from models.labellers import load_labeller
        labeller = load_labeller(cfg["labeller"])
    seeds = list(range(args.seed, args.seed + args.n))
    reports = []
    runs = presets(args.preset, cfg, [float(v) for v in args.scales.split(",")],
                   [float(v) for v in args.max_steps.split(",")])
    if args.runs:
        runs = json.loads(args.runs)
    vanilla_probs = None
    for run in runs:
        run.setdefault("temperature", args.temperature)
        rep = run_one(pipe, adp, cfg, run, seeds, args.bs, judge, real, args.asymmetric, rank, world,
                      real_labels, labeller, vanilla_probs)
        if rep is not None and "_probs" in rep:
            vanilla_probs = rep.pop("_probs")
        if rep is not None:
            reports.append(rep)
            print(table(reports[-1:]).splitlines()[-1], flush=True)
    if rank != 0:
        torch.distributed.destroy_process_group()
        return 0
    md = (f"{args.preset}: n={args.n} (seeds {seeds[0]}-{seeds[-1]}), batch={args.bs} per process, processes={world}, device={device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}\n\n" + table(reports))
    if args.preset == "speed" and not args.runs:
        van = [r["wall_s"] for r in reports if r["spec"]["mode"] == "vanilla"]
        guided = [r["wall_s"] for r in reports if r["spec"]["mode"] != "vanilla"][0]
        md += f"\n\nguided / vanilla wall time: {guided / (sum(van) / len(van)):.3f} (vanilla runs: {van})"
    if args.preset == "balance" and not args.runs:
        wall = {r["name"]: r["wall_s"] for r in reports}
        md += ("\n\nrunning balance / per batch (quota, batch 4), wall time: "
               f"{wall[runs[2]['name']] / wall[runs[1]['name']]:.3f}")
    if args.preset == "distributed" and not args.runs:
        md += (f"\n\nall-reduced / per-rank guidance wall time ({world} processes): "
               f"{reports[0]['wall_s'] / reports[1]['wall_s']:.3f}")
    if world > 1:
        torch.distributed.destroy_process_group()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.preset}.md").write_text(md + "\n")
    (out / f"{args.preset}.json").write_text(json.dumps(reports, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
