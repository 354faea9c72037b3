"""Judge-measured comparison of sampling modes on an unconditional config (benchmark kind ``guidance``).

    python bench/run.py guidance --only acceptance            # docs/results_acceptance (bench/lists/guidance.yml)
    python bench/guidance_eval.py --preset acceptance --n 100 --out runs/acc   # one entry, sizes overridden

An entry lists run specs (vanilla, distribution- or sample-guided; their keys: bench/runlist.py)
sampled on the same seeds. The table (FD per attribute with bootstrap CI, raw and corrected for
the judge's confusion, joint FD, drift of what was not targeted, feature-space Frechet distance
to held-out real digits, confident-recognition share, seconds per image) goes to the entry's
output, every number to the .json beside it. Under torchrun the ranks split each batch's seeds
and the judge runs on rank 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.runlist import RUN_KEYS, guidance_overrides
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.app.runtime import process_group, setup_logging
from utils.evaluation.evaluate import (evaluate_images, fd_cell, fractions_cell, judge_from_config,
                                       real_reference, real_reference_labels)
from utils.guidance import build_guide, build_plan
from utils.guidance.targets import joint_classes, parse_fraction_vector
from utils.sampling.pipeline import load_adp_for, load_pipeline, plan_batches, sample_batches


def make_plan(run: dict, cfg: dict, adp, prompt: str | None = None):
    """The run spec's guidance plan: the config's settings with the spec's ``guidance:`` over them
    (a text-to-image ``prompt``: refined within that prompt's class fractions)."""
    unknown = sorted(set(run) - RUN_KEYS)
    if unknown:
        raise ValueError(f"run {run.get('name')!r}: unknown key(s) {unknown}; allowed: {sorted(RUN_KEYS)}")
    return build_plan(cfg, run["mode"], run["targets"], adp.attributes, run.get("guidance"), None,
                      adp.priors(prompt))


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


def wall_ratio_lines(reports: list[dict], ratios: list[dict]) -> list[str]:
    """'LABEL: mean wall time of the runs ``over`` / that of the runs ``under``' per ratio."""
    wall = {r["name"]: r["wall_s"] for r in reports}
    lines = []
    for spec in ratios:
        missing = [n for n in spec["over"] + spec["under"] if n not in wall]
        if missing:
            raise ValueError(f"wall_ratios {spec['label']!r}: no run named {missing}; runs: {list(wall)}")
        over, under = ([wall[n] for n in spec[k]] for k in ("over", "under"))
        ratio = (sum(over) / len(over)) / (sum(under) / len(under))
        walls = ", ".join(f"{n} {wall[n]} s" for n in spec["over"] + spec["under"])
        lines.append(f"{spec['label']}: {ratio:.3f} ({walls})")
    return lines


def run_entry(entry, ctx) -> None:
    """Sample and judge every run of a ``guidance`` entry; write its table and JSON (rank 0)."""
    cfg = load_config(entry["config"])
    with process_group(ctx.device) as (rank, world, device):
        pipe = load_pipeline(cfg, device)
        adp = load_adp_for(pipe, entry["adp"] or cfg["adp"])
        judge, real, real_labels = judge_from_config(cfg), real_reference(cfg), real_reference_labels(cfg)
        labeller = None
        if cfg.get("labeller"):              # loaded once, shared by the runs that check their images
            from models.labellers import load_labeller
            labeller = load_labeller(cfg["labeller"])
        seeds = list(range(entry["seed"], entry["seed"] + entry["n"]))
        reports, vanilla_probs = [], None
        for run in entry["runs"]:
            if run["mode"] != "vanilla":
                run = dict(run, guidance=guidance_overrides(entry, run))
            rep = run_one(pipe, adp, cfg, run, seeds, entry["bs"], judge, real, entry["asymmetric"], rank, world,
                          real_labels, labeller, vanilla_probs)
            if rep is not None and "_probs" in rep:
                vanilla_probs = rep.pop("_probs")
            if rep is not None:
                reports.append(rep)
                print(table(reports[-1:]).splitlines()[-1], flush=True)
    if rank != 0:
        return
    out = ctx.out(entry.output)
    md = (f"{out.stem}: n={entry['n']} (seeds {seeds[0]}-{seeds[-1]}), batch={entry['bs']} per process, "
          f"processes={world}, device={device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}\n\n" + table(reports))
    md += "".join(f"\n\n{line}" for line in wall_ratio_lines(reports, entry["wall_ratios"]))
    out.with_suffix(".json").write_text(json.dumps(reports, indent=1) + "\n")
    out.write_text(md + "\n")
    print(md)


@guarded
def main(argv=None) -> int:
    """One entry of bench/lists/guidance.yml by name, its sizes and paths overridden by flags."""
    from bench.run import Context, run_entry as run_any
    from bench.runlist import load_list, list_path
    entries = {e.name: e for e in load_list("guidance") if e.kind == "guidance"}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", "--preset", dest="preset", default="acceptance", choices=sorted(entries),
                   help="the entry of bench/lists/guidance.yml (--preset: the same; not a guidance preset)")
    p.add_argument("--config", help="config (default: the entry's)")
    p.add_argument("--adp", help="ADP checkpoint (default: the entry's, else the config's adp)")
    p.add_argument("--n", "--images", dest="n", type=int, help="images per run (default: the entry's)")
    p.add_argument("--bs", type=int, help="batch size per process (default: the entry's)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed (image k of every row uses seed + k; default 0, not the entry's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--asymmetric", action="store_true", help="the asymmetric reverse process")
    p.add_argument("--out", default="runs/bench_guidance", help="folder for <preset>.md and <preset>.json")
    args = p.parse_args(argv)
    setup_logging()
    over = {k: v for k, v in (("config", args.config), ("adp", args.adp), ("n", args.n), ("bs", args.bs),
                              ("seed", args.seed)) if v is not None}
    if args.asymmetric:
        over["asymmetric"] = True
    over["processes"] = 1              # under torchrun the processes are this command's own
    out = Path(args.out).resolve() / f"{args.preset}.md"       # the flag's folder, not the list's path
    entry = dataclasses.replace(entries[args.preset].with_fields(over), output=str(out))
    run_any(entry, Context(list_path("guidance"), args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
