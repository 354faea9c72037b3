"""Judge-measured debiasing of a text-conditional config, per prompt (benchmark kinds ``t2i`` and
``t2i_speed``; the same seeds for every run).

    python bench/run.py t2i --only acceptance                 # docs/results_t2i/acceptance.md
    python bench/t2i_eval.py --preset vanilla --cfg 1 2 3 --out runs/t2i   # one entry of bench/lists/t2i.yml

The model is the entry's config (``configs/digits16_t2i.yml``: ``pretrained/digits16_t2i``, a
stock diffusers pipeline folder) with its ADP; the judge is the config's. For each prompt the
Frechet distance (judge features) is to the held-out real digits the prompt allows (a small
digit: 0-4), and ``in prompt`` is the share of images the judge reads as one of those digits.
Each run samples at its CFG scale (``cfg:``, else the entry's); with ``cfg_scales:`` the entry's
runs repeat at each scale (``{cfg}`` in a name is the scale). The vanilla run of a prompt at a
run's CFG scale is the reference of its drift column; its judgement is cached (``cache:``) under
the model's hash, the prompt, the scale and the seeds, and reused by later entries.
Writes the table to the entry's output and every number to the .json beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.guidance_eval import make_plan, run_one
from bench.runlist import guidance_overrides, load_list
from models.digits_t2i import parse_prompts
from models.files import load_tensors, resolve_path
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.app.runtime import pick_device, setup_logging
from utils.evaluation.evaluate import (fd_cell, fractions_cell, judge_from_config,
                                       real_reference, real_reference_labels)
from utils.sampling.pipeline import load_adp_for, plan_batches, sample_batches
from utils.sampling.text2image import load_t2i


def digit_target(digits: list[int]) -> str:
    """Uniform over the prompt's digits (a zero share elsewhere), as a --target value."""
    return ":".join(f"{1 / len(digits):.6g}" if d in digits else "0" for d in range(10))


def _for_prompt(spec: dict, digits: list[int]) -> dict:
    """Targets with ``prompt`` (the digit attribute: uniform over the prompt's digits) filled in."""
    out = {}
    for a, v in spec.items():
        if v == "prompt" and a != "digit":
            raise ValueError(f"target {a}: prompt: only the digit attribute can be 'uniform over the prompt's digits'")
        out[a] = digit_target(digits) if v == "prompt" else v
    return out


def expand_runs(runs: list[dict], cfg: float, scales: list[float] | None, digits: list[int]) -> list[dict]:
    """The concrete runs for one prompt: each with its CFG scale, once per scale of ``scales``
    ('{cfg}' in a name: the scale as %g), the prompt's digit targets filled in."""
    out = []
    for w in (scales or [None]):
        for run in runs:
            r = dict(run, cfg=float(w if w is not None else run.get("cfg", cfg)))
            r["name"] = run["name"].replace("{cfg}", f"{r['cfg']:g}")
            for key in ("targets", "eval"):
                if key in r:
                    r[key] = _for_prompt(r[key], digits)
            out.append(r)
    return out


def runs_for(preset: str, prompt: str, digits: list[int], scales: tuple[float, ...] | None = None) -> list[dict]:
    """The runs of entry ``preset`` of bench/lists/t2i.yml for one prompt; ``scales`` replace the
    entry's ``cfg_scales``."""
    entry = next(e for e in load_list("t2i") if e.name == preset)
    return expand_runs(entry["runs"], entry["cfg"], list(scales) if scales else entry["cfg_scales"], digits)


def evaluate_run(pipe, adp, cfg, run, seeds, bs, judge, real, real_labels, labeller, digits, vanilla_probs):
    """One row: sample at the run's CFG scale, judge; ``in_prompt``: the share of images the
    judge reads as one of the prompt's digits."""
    spec = {k: v for k, v in run.items() if k != "cfg"}
    rep = run_one(dataclasses.replace(pipe, cfg_scale=run["cfg"]), adp, cfg, spec, seeds, bs, judge,
                  real, real_labels=real_labels, labeller=labeller, vanilla_probs=vanilla_probs)
    rep.update(cfg=run["cfg"], spec=run,
               in_prompt=float(sum(rep["attributes"]["digit"]["fractions"][d] for d in digits)))
    return rep


def table(reports: list[dict], record: dict) -> str:
    lines = ["| prompt | run | parity even/odd (judge; record) | FD parity [95% CI] | corrected FD | "
             "digit FD (uniform over the prompt's digits) | magnitude low/high | in prompt | "
             "drift (magnitude) | Frechet (vanilla) | confident | s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        at = r["attributes"]
        rec = record.get(r["prompt"], {}).get("fractions", {}).get("parity", {}).get("even")
        par = f"{fractions_cell(at['parity'])} ({rec:.2f})" if rec is not None else fractions_cell(at["parity"])
        fd = fd_cell(at["parity"]) if "fd" in at["parity"] else "-"
        fd_c = fd_cell(at["parity"], "fd_corrected") if at["parity"].get("fd_corrected") is not None else "-"
        dig = f"{at['digit']['fd']:.3f}" if "fd" in at["digit"] else "-"
        drift = "; ".join(f"{m['drift']:.3f}" for b, m in r.get("drift", {}).items() if b == "magnitude") or "-"
        fr = f"{r['frechet']:.2f}"
        if r.get("frechet_vanilla") is not None and r["spec"]["mode"] != "vanilla":
            fr += f" ({r['frechet_vanilla']:.2f})"
        lines.append(f"| {r['prompt']} | {r['name']} | {par} | {fd} | {fd_c} | {dig} | "
                     f"{fractions_cell(at['magnitude'])} | {r['in_prompt']:.3f} | {drift} | {fr} | "
                     f"{r['confident_share']:.3f} | {r['wall_s'] / r['n']:.4f} |")
    return "\n".join(lines)


def speed(pipe, adp, cfg, prompt: str, n: int, bs: int, labeller, targets: dict, settings: dict) -> dict:
    """guided / vanilla wall time in one process: vanilla and guided batches alternate (the same
    seeds), after a warm-up pair; medians of seconds per batch."""
    from utils.guidance import build_guide
    pipe = pipe.with_prompt(prompt)
    plan = make_plan(dict(name="ours", mode="distribution", targets=targets, guidance=settings), cfg, adp, prompt)
    guide = build_guide(cfg, plan, adp, pipe.betas, labeller=labeller)
    times = {"vanilla": [], "guided": []}
    for k, b in enumerate([list(range(bs))] + plan_batches(list(range(n)), bs)):
        for name, p, g in (("vanilla", pipe, None), ("guided", pipe, guide)):
            t0 = time.perf_counter()
            for _ in sample_batches(p, [b], g, desc=name, progress=False):
                pass
            if k:
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"prompt": prompt, "batch": bs, "batches": len(times["vanilla"]), "seconds": times,
            "median_s": med, "ratio": med["guided"] / med["vanilla"], "settings": plan.to_dict()}


def _setup(entry, ctx, guided: bool):
    """(config, pipeline, prompts with their digits, ADP, labeller) of a t2i entry."""
    cfg = load_config(entry["config"])
    pipe = load_t2i(cfg, pick_device(ctx.device))
    allowed = {p.text: list(p.digits) for p in parse_prompts(cfg.get("prompts") or {})}
    unknown = [q for q in entry["prompts"] if q not in allowed]
    if unknown:
        raise ValueError(f"{entry.where}: prompt(s) {unknown} are not in {entry['config']}'s prompts: {sorted(allowed)}")
    adp = load_adp_for(pipe, entry["adp"] or cfg["adp"], check_grid=False) if guided else None
    labeller, spec = None, entry["labeller"] or cfg.get("labeller")   # the entry's replaces the config's
    if spec and guided:
        from models.labellers import load_labeller
        labeller = load_labeller(spec)
    return cfg, pipe, allowed, adp, labeller


def run_speed_entry(entry, ctx) -> None:
    """Kind t2i_speed: the wall-time ratio per prompt; writes the table and the JSON beside it."""
    cfg, pipe, _, adp, labeller = _setup(entry, ctx, guided=True)
    rows = [speed(pipe, adp, cfg, q, entry["n"], entry["bs"], labeller, entry["targets"], entry["guidance"])
            for q in entry["prompts"]]
    md = (f"speed: {entry['n']} images per prompt, batch {entry['bs']}, vanilla and guided (ours, parity 50/50) "
          f"batches alternating, device {pipe.device}, torch threads {torch.get_num_threads()}\n\n"
          "| prompt | vanilla s/batch (median) | guided s/batch (median) | guided / vanilla |\n|---|---|---|---|\n"
          + "\n".join(f"| {r['prompt']} | {r['median_s']['vanilla']:.2f} | {r['median_s']['guided']:.2f} | "
                      f"{r['ratio']:.3f} |" for r in rows))
    out = ctx.out(entry.output)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.write_text(md + "\n")
    print(md)


def run_entry(entry, ctx) -> None:
    """Kind t2i: every run for every prompt; writes the table and the JSON beside it."""
    guided = any(r["mode"] != "vanilla" for r in entry["runs"])
    cfg, pipe, allowed, adp, labeller = _setup(entry, ctx, guided)
    record = json.loads(resolve_path(Path(pipe.model_id["checkpoint"]) / "record.json").read_text()).get("prompts", {})
    judge = judge_from_config(cfg)
    real_all, labels_all = real_reference(cfg), real_reference_labels(cfg)
    seeds = list(range(entry["seed"], entry["seed"] + entry["n"]))
    cache_dir = resolve_path(entry["cache"])     # shared: keyed by model, prompt, CFG and seeds
    reports = []
    for q in entry["prompts"]:
        keep = np.isin(labels_all["digit"], allowed[q])
        real = real_all[torch.from_numpy(keep)]
        labels = {a: v[keep] for a, v in labels_all.items()}
        qpipe = pipe.with_prompt(q)
        vanilla = {}                       # CFG scale -> (judge probs, Frechet) of its vanilla row
        for run in expand_runs(entry["runs"], entry["cfg"], entry["cfg_scales"], allowed[q]):
            if run["mode"] != "vanilla":
                run = dict(run, guidance=guidance_overrides(entry, run))
            ref = vanilla.get(run["cfg"], (None, None))
            cache = cache_dir / (f"{pipe.model_id['checkpoint_sha256'][:12]}_{q.replace(' ', '_')}_"
                                 f"cfg{run['cfg']:g}_{seeds[0]}-{seeds[-1]}.pt")     # model, prompt, CFG, seeds
            if run["mode"] == "vanilla" and cache.exists():      # the same images: judged once
                got = load_tensors(cache, "a vanilla run's cached judgement", ValueError)
                rep, probs = got["report"], got["probs"]
            else:
                rep = evaluate_run(qpipe, adp, cfg, run, seeds, entry["bs"], judge, real, labels, labeller,
                                   allowed[q], ref[0])
                probs = rep.pop("_probs", None)
                if run["mode"] == "vanilla":
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"report": rep, "probs": probs}, cache)
            rep = dict(rep, name=run["name"], spec=run)
            rep.update(prompt=q, frechet_vanilla=ref[1])
            reports.append(rep)
            print(table([rep], record).splitlines()[-1], flush=True)
            if run["mode"] == "vanilla":
                vanilla[run["cfg"]] = (probs, rep["frechet"])
    out = ctx.out(entry.output)
    md = (f"{out.stem}: n={entry['n']} per prompt and run (seeds {seeds[0]}-{seeds[-1]}), batch {entry['bs']} "
          f"unless the run says, device {pipe.device}, judge {cfg['judge']}\n\n" + table(reports, record))
    out.with_suffix(".json").write_text(json.dumps(reports, indent=1) + "\n")
    out.write_text(md + "\n")
    print(md)


@guarded
def main(argv=None) -> int:
    """One entry of bench/lists/t2i.yml by name, its sizes and paths overridden by flags."""
    from bench.run import Context, run_entry as run_any
    from bench.runlist import list_path
    entries = {e.name: e for e in load_list("t2i") if e.kind in ("t2i", "t2i_speed")}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", "--preset", dest="preset", default="acceptance", choices=sorted(entries),
                   help="the entry of bench/lists/t2i.yml (--preset: the same; not a guidance preset)")
    p.add_argument("--config", help="config (default: the entry's)")
    p.add_argument("--adp", help="ADP checkpoint (default: the entry's, else the config's adp)")
    p.add_argument("--prompts", help="prompts separated by '|' (default: the entry's)")
    p.add_argument("--n", type=int, help="images per run and prompt (default: the entry's)")
    p.add_argument("--cfg", type=float, nargs="+",
                   help="the CFG scales of an entry that repeats its runs per scale (vanilla, cfg); "
                        "1 is the conditional branch alone")
    p.add_argument("--bs", type=int, help="batch size (default: the entry's)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed (image k of every row uses seed + k; default 0, not the entry's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="folder for <preset>.md and <preset>.json (default: the entry's output)")
    p.add_argument("--cache", help="folder of the vanilla rows' judgements (default: the entry's)")
    args = p.parse_args(argv)
    entry = entries[args.preset]
    if args.cfg and not entry.get("cfg_scales"):
        scaled = sorted(n for n, e in entries.items() if e.get("cfg_scales"))
        p.error(f"--cfg sets the CFG scales of the entries that repeat their runs per scale ({scaled}); "
                f"--preset {args.preset} has its own (drop --cfg)")
    setup_logging()
    over = {k: v for k, v in (("config", args.config), ("adp", args.adp), ("n", args.n), ("bs", args.bs),
                              ("seed", args.seed), ("cfg_scales", args.cfg)) if v is not None}
    if args.prompts:
        over["prompts"] = args.prompts.split("|")
    if args.cache:
        over["cache"] = str(Path(args.cache).resolve())
    entry = entry.with_fields(over)
    if args.out:
        entry = dataclasses.replace(entry, output=str(Path(args.out).resolve() / f"{args.preset}.md"))
    run_any(entry, Context(list_path("t2i"), args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
