"""Judge-measured debiasing of the text-conditional default, per prompt (same seeds for every run).

    python bench/t2i_eval.py --preset vanilla --n 1000        # the bias per prompt at CFG 3 and 7.5
    python bench/t2i_eval.py --preset vanilla --cfg 1 2 3     # ... at other scales
    python bench/t2i_eval.py --preset acceptance --n 1000     # parity 50/50 (batch 100 / 8), 20/80, digit
    python bench/t2i_eval.py --preset rows --n 1000           # edit on the conditional rows only; paper preset
    python bench/t2i_eval.py --preset compare --n 200         # CFG rows (cond / both) and CFG 3 / 7.5, paper
    python bench/t2i_eval.py --preset fresh --seed 20000      # the default on unseen seeds
    python bench/t2i_eval.py --preset speed --n 400           # guided / vanilla wall time, alternating batches
    python bench/t2i_eval.py --preset cfg --n 1000            # vanilla and ours at CFG 1.5, 3, 5, 7.5, 10

The model is ``configs/digits16_t2i.yml`` (``pretrained/digits16_t2i``, a stock diffusers
pipeline folder) with its ADP; the judge is the independent digits judge. For each prompt the
Frechet distance (judge features) is to the held-out real digits the prompt allows (a small
digit: 0-4), and ``in prompt`` is the share of images the judge reads as one of those digits.
Rows: the vanilla run of a prompt at the row's CFG scale is the reference of its drift column.
Writes ``<preset>.md`` (the table) and ``<preset>.json`` (every number) to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.guidance_eval import run_one
from models.digits_t2i import parse_prompts
from models.files import load_tensors
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.app.runtime import pick_device, setup_logging
from utils.evaluation.evaluate import (fd_cell, fractions_cell, judge_from_config,
                                       real_reference, real_reference_labels)
from utils.sampling.pipeline import load_adp_for, plan_batches, sample_batches
from utils.sampling.text2image import load_t2i

VANILLA_SCALES = (3.0, 7.5)                                # --preset vanilla unless --cfg
CFG_SCALES = (1.5, 3.0, 5.0, 7.5, 10.0)                    # --preset cfg unless --cfg
BIASED = ["a digit", "a small digit", "a large digit"]      # the order of every table
GENERIC = ["a handwritten digit", "a number"]    # "a digit"'s distribution


def digit_target(digits: list[int]) -> str:
    """Uniform over the prompt's digits (a zero share elsewhere), as a --target value."""
    return ":".join(f"{1 / len(digits):.6g}" if d in digits else "0" for d in range(10))


def runs_for(preset: str, prompt: str, digits: list[int], scales: tuple[float, ...] = VANILLA_SCALES) -> list[dict]:
    """Run specs (bench.guidance_eval keys) plus ``cfg`` (the CFG scale) for one prompt; ``scales``
    are the vanilla preset's CFG scales."""
    van = dict(mode="vanilla", eval={"parity": "0.5", "digit": digit_target(digits)})
    if preset == "vanilla":
        return [dict(van, name=f"vanilla, CFG {w:g}", cfg=float(w)) for w in scales]
    par = dict(mode="distribution", targets={"parity": "0.5"}, cfg=3.0)
    if preset == "cfg":           # balance at every CFG scale: vanilla and ours per scale
        return [run for w in scales for run in (dict(van, name=f"vanilla, CFG {w:g}", cfg=float(w)),
                                                 dict(par, name=f"ours parity 50/50, CFG {w:g}", cfg=float(w)))]
    if preset == "acceptance":
        return [dict(van, name="vanilla, CFG 3", cfg=3.0),
                dict(par, name="ours parity 50/50, batch 100"),
                dict(par, name="ours parity 50/50, batch 8, running balance", bs=8, running=True),
                dict(par, name="ours parity 20/80 (even/odd)", targets={"parity": "0.8"}),
                dict(par, name="ours digit uniform over the prompt's digits",
                     targets={"digit": digit_target(digits)})]
    if preset == "fresh":         # the default on seeds no choice was made on (--seed 20000)
        return [dict(van, name="vanilla, CFG 3", cfg=3.0), dict(par, name="ours parity 50/50, batch 100")]
    if preset == "rows":          # the CFG-row choice and the paper preset at the acceptance's size
        return [dict(van, name="vanilla, CFG 3", cfg=3.0),
                dict(par, name="ours, CFG 3, estimate cond, edit cond", cfg_edit="cond"),
                dict(par, name="paper preset, CFG 3 (both halves, KL, tau 8)", preset="paper")]
    if preset == "compare":
        return [dict(van, name="vanilla, CFG 3", cfg=3.0),
                dict(par, name="ours, CFG 3, estimate cond, edit both (default)"),
                dict(par, name="ours, CFG 3, estimate cond, edit cond", cfg_edit="cond"),
                dict(par, name="ours, CFG 3, estimate both, edit both", cfg_estimate="both"),
                dict(par, name="paper preset, CFG 3 (both halves, KL, tau 8)", preset="paper"),
                dict(van, name="vanilla, CFG 7.5", cfg=7.5),
                dict(par, name="ours, CFG 7.5 (default rows)", cfg=7.5),
                dict(par, name="paper preset, CFG 7.5", cfg=7.5, preset="paper")]
    raise ValueError(f"unknown preset {preset!r}")


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


def speed(pipe, adp, cfg, prompt: str, n: int, bs: int, labeller) -> dict:
    """guided / vanilla wall time in one process: vanilla and guided batches alternate (the same
    seeds), after a warm-up pair; medians of seconds per batch."""
    from utils.guidance import build_guide
    from bench.guidance_eval import make_plan
    pipe = pipe.with_prompt(prompt)
    plan = make_plan(dict(name="ours", mode="distribution", targets={"parity": "0.5"}), cfg, adp, prompt)
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


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16_t2i.yml")
    p.add_argument("--adp", help="ADP checkpoint (default: config adp)")
    p.add_argument("--preset", default="acceptance", choices=["vanilla", "acceptance", "rows", "compare", "fresh", "speed", "cfg"])
    p.add_argument("--prompts", help="prompts separated by '|' (default: the three biased ones; "
                   "--preset vanilla: all five)")
    p.add_argument("--n", type=int, default=1000, help="images per run and prompt")
    p.add_argument("--cfg", type=float, nargs="+",
                   help="--preset vanilla and cfg only: the CFG scales (default 3 7.5, cfg: 1.5 3 5 7.5 10; "
                        "1 is the conditional branch alone)")
    p.add_argument("--bs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="first seed (image k of every row uses seed + k)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="docs/results_t2i")
    p.add_argument("--cache", default="runs/t2i_vanilla_cache",
                   help="the vanilla rows' judgements, reused by later presets on the same model, prompt, "
                        "CFG and seeds")
    args = p.parse_args(argv)
    if args.cfg and args.preset not in ("vanilla", "cfg"):
        p.error(f"--cfg sets the vanilla and cfg presets' scales; --preset {args.preset} has its own (drop --cfg)")
    setup_logging()
    cfg = load_config(args.config)
    pipe = load_t2i(cfg, pick_device(args.device))
    prompts = args.prompts.split("|") if args.prompts else (BIASED + GENERIC if args.preset == "vanilla" else BIASED)
    allowed = {p.text: list(p.digits) for p in parse_prompts(cfg.get("prompts") or {})}
    unknown = [q for q in prompts if q not in allowed]
    if unknown:
        raise ValueError(f"prompt(s) {unknown} are not in {args.config}'s prompts: {sorted(allowed)}")
    record_path = Path(pipe.model_id["checkpoint"]) / "record.json"
    from models.files import resolve_path
    record = json.loads(resolve_path(record_path).read_text()).get("prompts", {})
    adp = None if args.preset == "vanilla" else load_adp_for(pipe, args.adp or cfg["adp"], check_grid=False)
    labeller = None
    if cfg.get("labeller") and args.preset != "vanilla":
        from models.labellers import load_labeller
        labeller = load_labeller(cfg["labeller"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.preset == "speed":
        rows = [speed(pipe, adp, cfg, q, args.n, args.bs, labeller) for q in prompts]
        md = (f"speed: {args.n} images per prompt, batch {args.bs}, vanilla and guided (ours, parity 50/50) "
              f"batches alternating, device {pipe.device}, torch threads {torch.get_num_threads()}\n\n"
              "| prompt | vanilla s/batch (median) | guided s/batch (median) | guided / vanilla |\n|---|---|---|---|\n"
              + "\n".join(f"| {r['prompt']} | {r['median_s']['vanilla']:.2f} | {r['median_s']['guided']:.2f} | "
                          f"{r['ratio']:.3f} |" for r in rows))
        (out / "speed.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "speed.md").write_text(md + "\n")
        print(md)
        return 0
    judge = judge_from_config(cfg)
    real_all, labels_all = real_reference(cfg), real_reference_labels(cfg)
    seeds = list(range(args.seed, args.seed + args.n))
    reports = []
    for q in prompts:
        keep = np.isin(labels_all["digit"], allowed[q])
        real = real_all[torch.from_numpy(keep)]
        labels = {a: v[keep] for a, v in labels_all.items()}
        qpipe = pipe.with_prompt(q)
        vanilla = {}                       # CFG scale -> (judge probs, Frechet) of its vanilla row
        scales = tuple(args.cfg or (CFG_SCALES if args.preset == "cfg" else VANILLA_SCALES))
        for run in runs_for(args.preset, q, allowed[q], scales):
            ref = vanilla.get(run["cfg"], (None, None))
            cache = Path(args.cache) / (f"{pipe.model_id['checkpoint_sha256'][:12]}_{q.replace(' ', '_')}_"
                                        f"cfg{run['cfg']:g}_{seeds[0]}-{seeds[-1]}.pt")     # model, prompt, CFG, seeds
            if run["mode"] == "vanilla" and cache.exists():      # the same images: judged once
                got = load_tensors(cache, "a vanilla run's cached judgement", ValueError)
                rep, probs = got["report"], got["probs"]
            else:
                rep = evaluate_run(qpipe, adp, cfg, run, seeds, args.bs, judge, real, labels, labeller,
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
    md = (f"{args.preset}: n={args.n} per prompt and run (seeds {seeds[0]}-{seeds[-1]}), batch {args.bs} "
          f"unless the run says, device {pipe.device}, judge {cfg['judge']}\n\n" + table(reports, record))
    (out / f"{args.preset}.md").write_text(md + "\n")
    (out / f"{args.preset}.json").write_text(json.dumps(reports, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
