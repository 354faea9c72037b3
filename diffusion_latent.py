"""Generation runs: vanilla, sample-guided or distribution-guided batches with a seed per image,
written as PNGs, a grid and a self-describing ``run.json``; and the demo on the embedded default.

The route of a run: ``generate`` (settings and targets validated, model and ADP loaded) ->
``run_generation`` (the batch plan, images written) -> ``utils.sampling.pipeline.sample_batches``
(the DDIM sampler with the guide's hooks) -> ``utils.guidance.guide.BatchGuide.edit``.
"""
from __future__ import annotations

import json
import logging
import time

import torch

from models.files import file_sha256, resolve_path
from utils.app.cli import guidance_overrides, output_path, read_prompts
from utils.app.rundir import RunFolder, RunFolderError
from utils.app.runtime import init_distributed
from utils.guidance import build_guide, build_plan
from utils.guidance.targets import attribute_list_targets, check_target_keys, parse_target_spec
from utils.sampling.images import read_images, save_grid, save_images  # noqa: F401 (read_images: API)
from utils.sampling.pipeline import (Pipeline, guided_head_map, load_adp_for, load_pipeline, plan_batches,
                                     sample_batches)
from utils.sampling.seeds import parse_seeds

log = logging.getLogger(__name__)


def run_generation(pipe: Pipeline, folder: RunFolder, seeds: list[int], batch_size: int, guide,
                   resolved: dict, asymmetric: bool = False, resume: bool = False,
                   rank: int = 0, world: int = 1) -> dict:
    """Generate one run into ``folder``: ``{seed:06d}.png`` per image, ``grid.png``, ``run.json``.

    :param guide: None (vanilla) or a ``Guide`` (``utils.guidance.build_guide``).
    With ``world`` > 1 (torchrun) every rank calls this with the same arguments; each writes the
    images of its share of every global batch, rank 0 the grid and ``run.json``.
    """
    out = folder.out
    done = folder.finished_seeds(seeds) if resume and rank == 0 else set()
    if world > 1:                     # every rank plans the same batches (rank 0's view)
        box = [sorted(done)]
        torch.distributed.broadcast_object_list(box, src=0)
        done = set(box[0])
    batches = plan_batches(seeds, batch_size, rank, world, done)
    if guide is not None and done and resolved.get("guidance", {}).get("settings", {}).get("running_balance"):
        log.warning("resuming a running-balance run: the balance restarts from the batches still "
                    "to do (the finished ones are not re-estimated)")
    record = {"status": "running", "identity": resolved["identity"], "resolved": resolved, "seeds": seeds,
              "model": pipe.model_id, "timesteps": pipe.timesteps, "device": str(pipe.device),
              "world_size": world}
    if rank == 0:
        folder.write_record(record)
    t0, dists, n_new = time.time(), [], 0
    for batch, imgs, estimate in sample_batches(pipe, batches, guide, asymmetric,
                                                desc=resolved.get("mode", "sample"), progress=rank == 0):
        keep = [k for k, s in enumerate(batch) if s not in done]     # never rewrite a finished image
        save_images(out, [batch[k] for k in keep], imgs[keep])
        n_new += len(keep)
        if estimate is not None:
            dists.append({"seeds": [batch[0], batch[-1]], "adp_distribution": estimate})
    wall = time.time() - t0
    if world > 1:
        torch.distributed.barrier()
    record.update({"status": "complete", "wall_time_s": round(wall, 2), "images_generated_now": n_new,
                   "adp_distribution_last_step": dists, **(guide.summary() if guide is not None else {})})
    if rank == 0:
        save_grid(out / "grid.png", [out / f"{s:06d}.png" for s in seeds[:100]])
        folder.write_record(record)
    return record


def raw_targets(args, mode: str, attributes: dict[str, list[str]]) -> dict[str, str]:
    """{key: raw target} from --target, or the original's --attribute_list + --male."""
    if args.target:
        pairs = parse_target_spec(args.target)
    elif args.attribute_list:
        pairs = attribute_list_targets(args.attribute_list, args.male, mode, attributes)
    else:
        raise ValueError(f"{mode} guidance needs --target (e.g. parity=0.5) or --attribute_list with --male")
    check_target_keys(pairs, attributes)
    return pairs


def generate(cfg: dict, args, mode: str) -> int:
    """One generation run (one process, or this rank's share under torchrun); the numeric flags
    were checked by the command line (``utils.app.cli.check_numbers``)."""
    seeds = parse_seeds(args.seeds, args.n_test_img, args.seed)
    rank, world, device = init_distributed(args.device)      # one process unless torchrun
    try:
        return _generate(cfg, args, mode, seeds, device, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def load_for_run(cfg: dict, args, device):
    """The run's pipeline: the config's model family decides (``sd``: text-to-image)."""
    if is_text_to_image(cfg):
        from utils.sampling.text2image import load_t2i
        return load_t2i(cfg, device, args.steps, args.eta, args.cfg, args.scheduler)
    if args.prompt or args.prompts:
        raise ValueError(f"--prompt / --prompts apply to text-to-image configs (model.family: sd); "
                         f"config {cfg.get('name')} is an unconditional {cfg['model'].get('family')} model")
    return load_pipeline(cfg, device, args.steps, args.eta)


def is_text_to_image(cfg: dict) -> bool:
    return (cfg.get("model") or {}).get("family") == "sd"


def _generate(cfg: dict, args, mode: str, seeds: list[int], device, rank: int, world: int) -> int:
    overrides = guidance_overrides(args)
    given = [k for k, v in overrides.items() if v is not None]
    if mode == "vanilla" and given:
        raise ValueError(f"guidance settings {given} apply to --mode sample or distribution, not vanilla")
    t2i = is_text_to_image(cfg)
    if t2i and world > 1:
        raise ValueError("text-to-image runs use one process: run them without torchrun")
    prompts = read_prompts(cfg, args) if t2i else [None]
    # everything is validated and loaded before the output folder is touched
    pipe = load_for_run(cfg, args, device)
    plan, adp, adp_sha, heads = None, None, None, None
    if mode != "vanilla":
        if not cfg.get("adp"):
            raise ValueError(f"{mode} guidance needs an ADP checkpoint: --adp PATH or 'adp' in the config")
        adp = load_adp_for(pipe, cfg["adp"], check_grid=False)
        adp_sha = file_sha256(resolve_path(cfg["adp"]))
        # text-to-image: each prompt's plan refines within that prompt's own class fractions
        plans = {q: build_plan(cfg, mode, raw_targets(args, mode, adp.attributes), adp.attributes,
                               overrides, args.scale, adp.priors(q)) for q in prompts}
        plan = plans[prompts[0]]
        heads = guided_head_map(adp, pipe.timesteps, plan.settings)
        if mode == "distribution" and args.bs_test * world < 2 and not plan.settings.running_balance:
            raise ValueError("distribution guidance needs --bs_test >= 2: the batch is the unit of "
                             "guidance (its predicted distribution is pushed to the target); add "
                             "--running_balance to balance a run of small batches, or use "
                             "--mode sample for one image at a time")
        if args.running_balance and mode != "distribution":
            raise ValueError("--running_balance applies to distribution guidance (--mode distribution)")
    judge = None
    if args.evaluate and rank == 0:
        from utils.evaluation.evaluate import judge_from_config
        judge = judge_from_config(cfg)
    root = output_path(args.exp)
    negative = (args.negative_prompt if args.negative_prompt is not None else cfg.get("negative_prompt")) or None
    labeller = None
    if plan is not None and plan.needs_labeller() and cfg.get("labeller"):
        from models.labellers import load_labeller
        labeller = load_labeller(cfg["labeller"])              # loaded once for every prompt
    for k, prompt in enumerate(prompts):
        out = root if len(prompts) == 1 else root / f"p{k:03d}"
        run_pipe = pipe.with_prompt(prompt, negative) if t2i else pipe
        # one guide per prompt: each prompt keeps its own running balance
        if plan is not None:
            plan = plans[prompt]
            if t2i:
                run_pipe.settings = plan.settings
        guide = None if plan is None else build_guide(cfg, plan, adp, pipe.betas, world > 1, labeller)
        text = None if not t2i else {"prompt": prompt, "negative_prompt": negative, "cfg": pipe.cfg_scale,
                                     "scheduler": type(pipe.pipe.scheduler).__name__,
                                     "resolution": pipe.image_shape[1]}
        _run_one(cfg, args, mode, seeds, run_pipe, guide, plan, adp_sha, heads, text, out, judge, rank, world)
    return 0


def _run_one(cfg, args, mode, seeds, pipe, guide, plan, adp_sha, heads, text, out, judge, rank, world):
    """One run folder: checked and locked, generated, (optionally) judged."""
    folder = RunFolder(out, pipe.image_shape)
    identity = {"mode": mode, "config": cfg.get("name"), "model_sha256": pipe.model_id["checkpoint_sha256"],
                "adp": str(resolve_path(cfg["adp"])) if plan else None, "adp_sha256": adp_sha,
                "steps": len(pipe.timesteps), "timesteps": pipe.timesteps,
                "eta": pipe.eta, "asymmetric": args.asymmetric, "batch_size": args.bs_test,
                "world_size": world, "guidance": plan.to_dict() if plan else None, "text": text}
    problem = None
    if rank == 0:
        try:
            folder.check(identity, args.overwrite, args.resume)
            folder.open(args.overwrite)
        except RunFolderError as e:
            problem = str(e)
    if world > 1:                     # every rank learns rank 0's verdict before anyone writes
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise RunFolderError(problem)
    resolved = {"mode": mode, "config": cfg.get("name"), "batch_size": args.bs_test, "world_size": world,
                "steps": len(pipe.timesteps), "eta": pipe.eta,
                "asymmetric": args.asymmetric, "adp": cfg.get("adp") if plan else None,
                "guidance": plan.to_dict() if plan else None, "heads": heads, "text": text,
                "identity": identity, "command": "python main.py " + " ".join(getattr(args, "_argv", []))}
    try:
        record = run_generation(pipe, folder, seeds, args.bs_test, guide, resolved, args.asymmetric,
                                args.resume, rank, world)
        if rank != 0:
            return
        print(f"wrote {len(seeds)} images to {folder.out} ({record['wall_time_s']} s)")
        if args.evaluate:
            from utils.evaluation.evaluate import evaluate_folder, format_table
            rep = evaluate_folder(folder.out, cfg, plan.requested if plan and mode == "distribution" else None, judge)
            (folder.out / "eval.json").write_text(json.dumps(rep, indent=1) + "\n")
            print(format_table([(mode, rep)], list(rep["attributes"])))
    finally:
        if rank == 0:
            folder.close()


def demo(cfg: dict, args) -> int:
    """Vanilla vs distribution-guided to the demo target (--target, else the config's demo:
    target), the same seeds (--seeds, else --seed and --n_test_img, else the config's demo: n);
    judged against that target; a side-by-side grid. A text-to-image config runs each of its
    demo: prompts (or --prompt / --prompts), a row of the table and of the grid per prompt."""
    import numpy as np
    from PIL import Image
    from utils.evaluation.evaluate import evaluate_folder, format_table, judge_from_config
    from utils.guidance.targets import joint_classes, parse_fraction_vector
    spec = cfg.get("demo", {})
    target = args.target or spec.get("target")
    if not target:
        raise ValueError(f"config {cfg.get('name')} has no demo: target; pass --target (e.g. parity=0.5)")
    root = output_path(args.exp if args.exp != "runs/generate" else "runs/demo")
    n = args.n_test_img if args.n_test_img != 100 else int(spec.get("n", 100))
    seeds = parse_seeds(args.seeds, n, args.seed)
    prompts = [None]
    if is_text_to_image(cfg):
        prompts = read_prompts(cfg, type(args)(**{**vars(args), "prompt_list": spec.get("prompts")}))
    judge, rows = judge_from_config(cfg), []
    pipe_attrs = judge.attributes
    fractions = {k: parse_fraction_vector(k, v, joint_classes(k, pipe_attrs)).tolist()
                 for k, v in parse_target_spec(target).items()}
    for mode in ("vanilla", "distribution"):
        sub = type(args)(**{**vars(args), "exp": str(root / mode), "mode": mode, "target": target,
                            "seeds": ",".join(map(str, seeds)), "evaluate": False,
                            "overwrite": True, "resume": False,       # the demo's own run folders
                            "prompt_list": prompts if prompts != [None] else None})
        if mode == "vanilla":         # the guidance flags are the guided run's
            for k in ("preset", "estimator", "running_balance", "refine", "refine_within", "check", "guide_steps",
                      "cfg_edit", "cfg_estimate"):
                setattr(sub, k, None)
        generate(cfg, sub, mode)
    sides = []
    for k, prompt in enumerate(prompts):
        where = {m: root / m if len(prompts) == 1 else root / m / f"p{k:03d}" for m in ("vanilla", "distribution")}
        label = "" if prompt is None else f"{prompt}: "
        rows += [(label + m, evaluate_folder(where[m], cfg, fractions, judge)) for m in where]
        grids = [np.asarray(Image.open(where[m] / "grid.png")) for m in where]
        gap = np.full((grids[0].shape[0], 8) + grids[0].shape[2:], 255, np.uint8)
        sides.append(np.concatenate([grids[0], gap, grids[1]], axis=1))
    table = format_table(rows, [a for a in fractions if "*" not in a])
    gap = np.full((8,) + sides[0].shape[1:], 255, np.uint8)
    side = np.concatenate([part for s in sides for part in (s, gap)][:-1], axis=0)
    Image.fromarray(side).resize((side.shape[1] * 3, side.shape[0] * 3), Image.NEAREST).save(root / "side_by_side.png")
    (root / "results.md").write_text(table + "\n")
    print(table)
    order = "" if prompts == [None] else " (rows, top to bottom: " + "; ".join(prompts) + ")"
    print(f"side-by-side grid: {root / 'side_by_side.png'}{order}")
    return 0

