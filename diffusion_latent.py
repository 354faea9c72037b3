"""Generation runs: vanilla, sample-guided or distribution-guided batches with a seed per image,
written as PNGs, a grid and a self-describing ``run.json``; and the demo on the embedded default.

The route of a run: ``generate`` (settings and targets validated, model and ADP loaded) ->
``run_generation`` (the batch plan, images written) -> ``utils.sampling.pipeline.sample_batches``
(the DDIM sampler with the guide's hooks) -> ``utils.guidance.guide.BatchGuide.edit``.
"""
from __future__ import annotations

import json
import logging
import re
import time

import torch

from models.files import file_sha256, resolve_path
from utils.app.cli import n_images, output_path, read_prompts
from utils.app.api import balance, load  # noqa: F401 (the Python API: utils/app/api.py)
from utils.app.rundir import RunFolder, RunFolderError
from utils.app.runtime import process_group
from utils.config import RunConfig
from utils.guidance import build_guide, build_plan
from utils.guidance.settings import FLAG_NAMES, overrides_from_args, resolve_settings
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
    global_batches = plan_batches(seeds, batch_size * world, 0, 1, done)     # the same batches, whole
    for whole, (batch, imgs, estimate) in zip(global_batches, sample_batches(
            pipe, batches, guide, asymmetric, desc=resolved.get("mode", "sample"), progress=rank == 0)):
        keep = [k for k, s in enumerate(batch) if s not in done]     # never rewrite a finished image
        save_images(out, [batch[k] for k in keep], imgs[keep])
        n_new += len(keep)
        if estimate is not None:     # the estimate is the global batch's (all-reduced over the ranks)
            dists.append({"seeds": [whole[0], whole[-1]], "adp_distribution": estimate})
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
    seeds = parse_seeds(args.seeds, n_images(args), args.seed)
    with process_group(args.device) as (rank, world, device):      # one process unless torchrun
        return _generate(cfg, args, mode, seeds, device, rank, world)


#: flags that only a text-to-image config reads
T2I_FLAGS = ("prompt", "prompts", "negative_prompt", "cfg", "scheduler", "cfg_edit", "cfg_estimate")


def run_scheduler(cfg: dict, args, mode: str) -> str | None:
    """The text-to-image scheduler of a run: --scheduler; else, under the paper preset, the model
    folder's own (the original's SD code samples with it); else None (the config's)."""
    if args.scheduler or mode == "vanilla":
        return args.scheduler
    from models.t2i import OWN_SCHEDULER
    rc = RunConfig.of(cfg)
    preset = resolve_settings(rc.guidance, overrides_from_args(args), rc.family).preset
    return OWN_SCHEDULER if preset == "paper" else None


def load_for_run(cfg: dict, args, device, mode: str = "vanilla"):
    """The run's pipeline: the config's model family decides (``sd``: text-to-image)."""
    if is_text_to_image(cfg):
        if args.asymmetric:
            raise ValueError("--asymmetric applies to the unconditional DDIM sampler, not to text-to-image")
        from utils.sampling.text2image import load_t2i
        return load_t2i(cfg, device, args.steps, args.eta, args.cfg, run_scheduler(cfg, args, mode))
    given = [f"--{k}" for k in T2I_FLAGS if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: text-to-image flag(s) (a config of a text-to-image family); "
                         f"config {RunConfig.of(cfg).name} is an unconditional {RunConfig.of(cfg).family} model")
    return load_pipeline(cfg, device, args.steps, args.eta)


def is_text_to_image(cfg: dict) -> bool:
    return RunConfig.of(cfg).text_to_image


def check_prompt_root(root, n_prompts: int) -> None:
    """A run of several prompts writes one sub-folder pNNN per prompt: its --exp must hold
    nothing else (e.g. not a single-prompt run)."""
    if n_prompts < 2 or not root.is_dir():
        return
    other = sorted(p.name for p in root.iterdir() if not (p.is_dir() and re.fullmatch(r"p\d{3}", p.name)))
    if other:
        raise RunFolderError(f"--exp {root} holds {other[:5]}{' ...' if len(other) > 5 else ''}, not a "
                             f"run of several prompts (one sub-folder pNNN per prompt); choose another --exp")


def _generate(cfg: dict, args, mode: str, seeds: list[int], device, rank: int, world: int) -> int:
    overrides = overrides_from_args(args)
    given = [k for k, v in overrides.items() if v is not None]
    if mode == "vanilla" and given:
        raise ValueError(f"guidance settings {given} apply to --mode sample or distribution, not vanilla")
    if mode == "vanilla" and args.scale is not None:
        raise ValueError("--scale applies to --mode sample or distribution, not vanilla")
    rc = RunConfig.of(cfg)
    t2i = rc.text_to_image
    prompts = read_prompts(cfg, args) if t2i else [None]
    root = output_path(args.exp)
    check_prompt_root(root, len(prompts))
    # everything is validated and loaded before the output folder is touched
    pipe = load_for_run(cfg, args, device, mode)
    plan, adp, adp_sha, heads = None, None, None, None
    if mode != "vanilla":
        if not rc.adp:
            raise ValueError(f"{mode} guidance needs an ADP checkpoint: --adp PATH or 'adp' in the config")
        adp = load_adp_for(pipe, rc.adp, check_grid=False)
        adp_sha = file_sha256(resolve_path(rc.adp))
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
    if args.evaluate and rank == 0:       # a judge that cannot measure this run fails before it starts
        from utils.evaluation.evaluate import check_evaluable, judge_from_config
        judge = judge_from_config(cfg)
        check_evaluable(cfg, judge, plan.requested if plan else None)
    negative = (args.negative_prompt if args.negative_prompt is not None else rc.negative_prompt) or None
    labeller = None
    if plan is not None and plan.needs_labeller() and rc.labeller:
        from models.labellers import load_labeller
        labeller = load_labeller(rc.labeller)                  # loaded once for every prompt
    runs = []
    for k, prompt in enumerate(prompts):
        out = root if len(prompts) == 1 else root / f"p{k:03d}"
        run_pipe = pipe.with_prompt(prompt, negative) if t2i else pipe
        # one guide per prompt: each prompt keeps its own running balance
        if plan is not None:
            plan = plans[prompt]
        guide = None if plan is None else build_guide(cfg, plan, adp, pipe.betas, world > 1, labeller)
        text = None if not t2i else {"prompt": prompt, "negative_prompt": negative, "cfg": pipe.cfg_scale,
                                     "scheduler": type(pipe.pipe.scheduler).__name__,
                                     "resolution": pipe.image_shape[1]}
        folder = RunFolder(out, run_pipe.image_shape)
        identity = {"mode": mode, "config": rc.name, "model_sha256": pipe.model_id["checkpoint_sha256"],
                    "adp": str(resolve_path(rc.adp)) if plan else None, "adp_sha256": adp_sha,
                    "steps": len(pipe.timesteps), "timesteps": pipe.timesteps,
                    "eta": pipe.eta, "asymmetric": args.asymmetric, "batch_size": args.bs_test,
                    "world_size": world, "guidance": plan.to_dict() if plan else None, "text": text}
        runs.append((run_pipe, guide, plan, identity, text, folder))
    for *_, identity, _, folder in runs:              # every folder is checked before any is written
        _agree(rank, world, lambda: folder.check(identity, args.overwrite, args.resume, seeds))
    for run_pipe, guide, plan, identity, text, folder in runs:
        _run_one(cfg, args, mode, seeds, run_pipe, guide, plan, heads, identity, text, folder, judge, rank, world)
    return 0


def _agree(rank: int, world: int, check) -> None:
    """Run ``check`` on rank 0; every rank raises its RunFolderError (or none) alike."""
    problem = None
    if rank == 0:
        try:
            check()
        except RunFolderError as e:
            problem = str(e)
    if world > 1:                     # every rank learns rank 0's verdict before anyone writes
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise RunFolderError(problem)


def _run_one(cfg, args, mode, seeds, pipe, guide, plan, heads, identity, text, folder, judge, rank, world):
    """One run folder (checked): locked, generated, (optionally) judged."""
    _agree(rank, world, lambda: folder.open(args.overwrite))
    rc = RunConfig.of(cfg)
    resolved = {"mode": mode, "config": rc.name, "batch_size": args.bs_test, "world_size": world,
                "steps": len(pipe.timesteps), "eta": pipe.eta,
                "asymmetric": args.asymmetric, "adp": rc.adp if plan else None,
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
            rep = evaluate_folder(folder.out, cfg, plan.requested if plan else None, judge)   # sample: the class
            (folder.out / "eval.json").write_text(json.dumps(rep, indent=1) + "\n")
            print(format_table([(mode, rep)], list(rep["attributes"])))
    except BaseException:
        if rank == 0:
            folder.abandon()          # a run that wrote no image leaves the folder as it found it
        raise
    finally:
        if rank == 0:
            folder.close()


#: what a demo writes into its --exp folder
DEMO_ENTRIES = ("distribution", "vanilla", "results.md", "side_by_side.png")
#: the guidance flags a demo's vanilla run leaves out (they are the guided run's)
GUIDED_ONLY = (*FLAG_NAMES, "scale")


def check_demo_root(root, overwrite: bool, resume: bool) -> None:
    """A demo writes DEMO_ENTRIES into a new or empty folder, or replaces an earlier demo there
    with --overwrite; a folder holding anything else is refused."""
    if resume:
        raise ValueError("--demo runs afresh (vanilla, then guided, the same seeds); --resume does not apply")
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"--exp {root} is a file, not a folder")
    if not root.exists() or not any(root.iterdir()):
        RunFolder(root).check({}, False, False)              # can it be made and written
        return
    other = sorted(p.name for p in root.iterdir() if p.name not in DEMO_ENTRIES)
    if other:
        raise RunFolderError(f"--demo writes {', '.join(DEMO_ENTRIES)} into --exp {root}, which holds other "
                             f"files ({other[:5]}{' ...' if len(other) > 5 else ''}); choose another --exp")
    if not overwrite:
        raise RunFolderError(f"{root} holds an earlier demo; pass --overwrite to replace it, or choose "
                             f"another --exp")


def demo(cfg: dict, args) -> int:
    """Vanilla vs distribution-guided to the demo target (--target, else the config's demo:
    target), the same seeds (--seeds, else --seed and --n_test_img, else the config's demo: n);
    judged against that target; a side-by-side grid of every image, labelled. A text-to-image
    config runs each of its demo: prompts (or --prompt / --prompts), a row of the table and of
    the grid per prompt. The guided run goes first: a setting it refuses stops the demo before
    anything is written."""
    from utils.evaluation.evaluate import evaluate_folder, fd_cell, format_table, judge_from_config
    from utils.guidance.targets import joint_classes, parse_fraction_vector
    rc = RunConfig.of(cfg)
    spec = rc.demo
    target = args.target or spec.target
    if not target:
        raise ValueError(f"config {rc.name} has no demo: target; pass --target (e.g. parity=0.5)")
    root = output_path(args.exp)
    check_demo_root(root, args.overwrite, args.resume)
    n = n_images(args, spec.n)
    seeds = parse_seeds(args.seeds, n, args.seed)
    prompts = [None]
    if is_text_to_image(cfg):
        prompts = read_prompts(cfg, type(args)(**{**vars(args), "prompt_list": spec.prompts}))
    judge, rows = judge_from_config(cfg), []
    fractions = {k: parse_fraction_vector(k, v, joint_classes(k, judge.attributes)).tolist()
                 for k, v in parse_target_spec(target).items()}
    guided_args = {**vars(args), "mode": "distribution", "target": target, "seeds": ",".join(map(str, seeds)),
                   "evaluate": False, "resume": False, "prompt_list": prompts if prompts != [None] else None}
    scheduler = run_scheduler(cfg, type(args)(**guided_args), "distribution") if is_text_to_image(cfg) else None
    for mode in ("distribution", "vanilla"):
        sub = type(args)(**{**guided_args, "exp": str(root / mode), "mode": mode, "scheduler": scheduler})
        if mode == "vanilla":
            for k in GUIDED_ONLY:
                setattr(sub, k, None)
        generate(cfg, sub, mode)
    panels = []
    for k, prompt in enumerate(prompts):
        where = {m: root / m if len(prompts) == 1 else root / m / f"p{k:03d}" for m in ("vanilla", "distribution")}
        label = "" if prompt is None else f"{prompt}: "
        reports = {m: evaluate_folder(where[m], cfg, fractions, judge) for m in where}
        rows += [(label + m, reports[m]) for m in where]
        fd = {m: "; ".join(f"FD {a} {fd_cell(reports[m]['attributes'][a]).split(' [')[0]}"
                           for a in fractions if a in reports[m]["attributes"]) for m in where}
        panels.append([(f"{label}vanilla ({fd['vanilla']})", where["vanilla"]),
                       (f"{label}balanced to {target} ({fd['distribution']})", where["distribution"])])
    table = format_table(rows, [a for a in fractions if "*" not in a])
    labelled_grid(panels, seeds, root / "side_by_side.png")
    (root / "results.md").write_text(table + "\n")
    print(table)
    order = "" if prompts == [None] else " (rows, top to bottom: " + "; ".join(prompts) + ")"
    print(f"side-by-side grid of all {len(seeds)} images per run: {root / 'side_by_side.png'}{order}")
    return 0


def labelled_grid(rows: list[list[tuple[str, object]]], seeds: list[int], path, upscale: int = 3) -> None:
    """One PNG: a row per entry of ``rows``, each a list of (label, run folder) panels side by
    side; a panel is the grid of every seed's image (10 columns up to 100 images, else 20), its
    label written above it."""
    import numpy as np
    from PIL import Image, ImageDraw
    from utils.sampling.images import grid_array, read_png
    ncol = min(len(seeds), 10 if len(seeds) <= 100 else 20)
    band, gap = 14, 12
    rendered = []
    for row in rows:
        tiles = []
        for label, folder in row:
            imgs = [read_png(folder / f"{s:06d}.png") for s in seeds]
            imgs = np.stack([np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a for a in imgs])
            grid = Image.fromarray(grid_array(imgs, ncol))
            grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
            tile = Image.new("RGB", (grid.width, grid.height + band), "white")
            tile.paste(grid, (0, band))
            ImageDraw.Draw(tile).text((2, 1), label, fill="black")
            tiles.append(tile)
        width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
        line = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
        x = 0
        for t in tiles:
            line.paste(t, (x, 0))
            x += t.width + gap
        rendered.append(line)
    out = Image.new("RGB", (max(r.width for r in rendered), sum(r.height for r in rendered) + gap * (len(rendered) - 1)),
                    "white")
    y = 0
    for r in rendered:
        out.paste(r, (0, y))
        y += r.height + gap
    out.save(path)
