"""What main.py does once its arguments are parsed: generate, extract, demo."""
from __future__ import annotations

import json
import logging

import torch

from diffusion_latent import load_adp_for, load_pipeline, prepare_out_dir, run_generation
from models.loader import resolve_path
from utils.cli import (joint_classes, parse_fraction_vector, parse_scales, parse_targets,
                       sample_class_index)
from utils.guidance import GuidanceConfig, refine_targets

log = logging.getLogger("main")


def build_guidance(cfg: dict, mode: str, raw: dict[str, str], adp, scale_spec: str | None = None,
                   guide_steps: str | None = None, **overrides):
    """(GuidanceConfig, sample classes {attr: index} | None, resolved targets) from raw target
    strings {attr: value}, the config's ``guidance:`` defaults and overrides (e.g. max_step;
    ``refine=False`` turns the config's refine map off). Resolved targets are the user's; with a
    refine map the guide may pursue them through a finer head (``GuidanceConfig.refined``)."""
    use_refine = overrides.pop("refine", None)
    gcfg = {**cfg.get("guidance", {}), **{k: v for k, v in overrides.items() if v is not None}}
    targets, guided, refined = None, raw, None
    if mode == "distribution":
        targets = {k: parse_fraction_vector(k, v, joint_classes(k, adp.attributes)) for k, v in raw.items()}
        guided = targets
        if gcfg.get("refine") and use_refine is not False:
            guided, refined = refine_targets(targets, gcfg["refine"], adp.attributes)
            refined = refined or None
    if gcfg.get("estimator") == "auto":       # quota for one attribute, soft for several
        gcfg["estimator"] = "quota" if len(guided) == 1 and not any("*" in k for k in guided) else "soft"
    if mode == "distribution" and gcfg.get("estimator", "soft") == "soft" and "soft" in gcfg:
        gcfg = {**gcfg, **gcfg["soft"], **{k: v for k, v in overrides.items() if v is not None}}
    scales = parse_scales(scale_spec, list(raw), gcfg.get(f"{mode}_scale", {}))
    for via, keys in (refined or {}).items():    # a finer head takes the scale of its first key
        scales[via] = scales.pop(keys[0])
        for k in keys[1:]:
            scales.pop(k)
    first, last = int(gcfg.get("first_step", 1)), gcfg.get("last_step")
    if guide_steps:
        a, _, b = guide_steps.partition(":")
        first, last = int(a or 0), (int(b) if b else None)
    common = dict(scales=scales, temperature=float(gcfg.get("temperature", 8.0)),
                  loss=gcfg.get("loss", "chi2"), first_step=first, last_step=last,
                  beta_power=float(gcfg.get("beta_power", 0.05)),
                  precondition=gcfg.get("precondition", "covariance"),
                  debias=bool(gcfg.get("debias", False)), commit=float(gcfg.get("commit", 0.0)),
                  estimator=gcfg.get("estimator", "soft"),
                  cap_per_attribute=bool(gcfg.get("cap_per_attribute", False)),
                  max_step=float(overrides.get("max_step")
                                 or gcfg.get(f"{mode}_max_step", gcfg.get("max_step", 0.5))))
    if mode == "distribution":
        return GuidanceConfig("distribution", guided, refined=refined, **common), None, \
            {a: [round(float(x), 6) for x in v] for a, v in targets.items()}
    if any("*" in k for k in raw):
        raise ValueError(f"joint targets ({[k for k in raw if '*' in k]}) need --mode distribution; "
                         f"sample guidance takes one class per attribute, e.g. parity=odd,magnitude=low")
    classes = {a: sample_class_index(a, v, adp.attributes[a]) for a, v in raw.items()}
    onehot = {a: [float(k == c) for k in range(len(adp.attributes[a]))] for a, c in classes.items()}
    return GuidanceConfig("sample", {a: torch.tensor(v) for a, v in onehot.items()}, **common), \
        classes, onehot


def generate(cfg: dict, device, args, mode: str, seeds: list[int], rank: int = 0,
             world: int = 1) -> int:
    """One generation run (one process, or this rank's share under torchrun)."""
    running = args.running_balance
    if running is None:
        running = mode == "distribution" and bool(cfg.get("guidance", {}).get("running_balance", False))
    if mode == "distribution" and args.bs_test * world < 2 and not running:
        raise ValueError("distribution guidance needs --bs_test >= 2: the batch is the unit of "
                         "guidance (its predicted distribution is pushed to the target); add "
                         "--running_balance to balance a run of small batches, or use "
                         "--mode sample for one image at a time")
    if args.running_balance and mode != "distribution":
        raise ValueError("--running_balance applies to distribution guidance (--mode distribution)")
    pipe = load_pipeline(cfg, device, args.steps, args.eta)
    check = args.check or cfg.get("guidance", {}).get("check") or "none"
    labeller = None
    if mode != "vanilla" and check != "none" and (running or mode == "sample"):
        labeller = load_labeller(check)
    guidance, classes, targets, adp = None, None, None, None
    if mode != "vanilla":
        if not cfg.get("adp"):
            raise ValueError(f"{mode} guidance needs an ADP checkpoint: --adp PATH or 'adp' in the config")
        adp = load_adp_for(pipe, cfg["adp"])
        raw = parse_targets(args, mode, adp.attributes)
        guidance, classes, targets = build_guidance(cfg, mode, raw, adp, args.scale, args.guide_steps,
                                                    estimator=args.estimator, refine=args.refine)
        guidance.distributed = world > 1
    out = resolve_path(args.exp)
    problem = None
    if rank == 0:
        try:
            prepare_out_dir(out, args.overwrite, args.resume)
        except FileExistsError as e:
            problem = str(e)
    if world > 1:                     # every rank learns rank 0's verdict before anyone writes
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise FileExistsError(problem)
    resolved = {"mode": mode, "config": cfg.get("name"), "targets": targets,
                "scales": guidance.scales if guidance else None,
                "guide_steps": [guidance.first_step, guidance.last_step] if guidance else None,
                "batch_size": args.bs_test, "world_size": world,
                "running_balance": running, "estimator": guidance.estimator if guidance else None,
                "check": check if labeller is not None else None,
                "guided_through": guidance.refined if guidance else None,
                "steps": len(pipe.sampler.timesteps),
                "eta": pipe.sampler.eta, "asymmetric": args.asymmetric, "adp": cfg.get("adp") if adp else None,
                "command": "python main.py " + " ".join(getattr(args, "_argv", []))}
    record = run_generation(pipe, out, seeds, args.bs_test, guidance, adp, resolved,
                            args.asymmetric, args.resume, classes, running, rank, world, labeller,
                            cfg.get("guidance", {}))
    if rank != 0:
        return 0
    print(f"wrote {len(seeds)} images to {out} ({record['wall_time_s']} s)")
    if args.evaluate:
        from utils.evaluate import evaluate_folder, format_table
        rep = evaluate_folder(out, cfg, targets if mode == "distribution" else None)
        (out / "eval.json").write_text(json.dumps(rep, indent=1) + "\n")
        print(format_table([(mode, rep)], list(rep["attributes"])))
    return 0


def load_labeller(spec: str):
    """An image classifier by name: digits_svc (the embedded default's SVM), or a judge file."""
    if spec == "digits_svc":
        from models.digits_judge import SVCLabeller
        return SVCLabeller()
    from models.judge import load_judge
    if not resolve_path(spec).is_file():
        raise FileNotFoundError(f"classifier {spec!r} not found ({resolve_path(spec)}): give digits_svc "
                                f"or a judge file (.pt / .onnx); --check none turns the check off")
    return load_judge(str(resolve_path(spec)))


def extract(cfg: dict, device, args) -> int:
    from utils.extract import extract_from_folders, extract_pseudo_labelled
    if not args.savepath:
        raise ValueError("extraction needs --savepath (the folder the h-vectors go to)")
    pipe = load_pipeline(cfg, device, args.steps, 0.0 if args.just_precompute else args.eta)
    meta = {"model": pipe.model_id, "config": cfg.get("name")}
    out = resolve_path(args.savepath)
    if args.just_precompute:
        if not args.test_path_one or not args.attribute:
            raise ValueError("--just_precompute needs --test_path_one (class folders) and --attribute")
        extract_from_folders(pipe.sampler, resolve_path(args.test_path_one), args.attribute, out,
                             meta, args.bs_test, device)
    else:
        from utils.seeds import parse_seeds
        seeds = parse_seeds(args.seeds, args.extract_pseudo, args.seed)
        extract_pseudo_labelled(pipe.sampler, seeds, load_labeller(args.labeller), out,
                                {**meta, "labeller": args.labeller}, args.bs_test, device)
    print(f"h-vectors in {out}")
    return 0


def demo(cfg: dict, device, args) -> int:
    """Vanilla vs distribution-guided (parity 50/50), same seeds; judged; side-by-side grid."""
    from utils.evaluate import evaluate_folder, format_table, judge_from_config
    import numpy as np
    from PIL import Image
    root = resolve_path(args.exp if args.exp != "runs/generate" else "runs/demo")
    n = args.n_test_img if args.n_test_img != 100 else 200
    seeds = list(range(args.seed, args.seed + n))
    judge, rows = judge_from_config(cfg), []
    for mode in ("vanilla", "distribution"):
        sub = type(args)(**{**vars(args), "exp": str(root / mode), "mode": mode, "target": args.target or "parity=0.5",
                            "overwrite": True, "evaluate": False})
        generate(cfg, device, sub, mode, seeds)
        rows.append((mode, evaluate_folder(root / mode, cfg, {"parity": [0.5, 0.5]}, judge)))
    table = format_table(rows, ["parity"])
    grids = [np.asarray(Image.open(root / m / "grid.png")) for m in ("vanilla", "distribution")]
    gap = np.full((grids[0].shape[0], 8) + grids[0].shape[2:], 255, np.uint8)
    side = np.concatenate([grids[0], gap, grids[1]], axis=1)
    Image.fromarray(side).resize((side.shape[1] * 3, side.shape[0] * 3), Image.NEAREST).save(root / "side_by_side.png")
    (root / "results.md").write_text(table + "\n")
    print(table)
    print(f"side-by-side grid: {root / 'side_by_side.png'}")
    return 0
