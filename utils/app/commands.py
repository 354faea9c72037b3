"""main.py's extraction command (script_extract_he.sh): h-vectors from labelled image folders
(DDIM inversion) or from generated samples labelled by a classifier."""
from __future__ import annotations

from pathlib import Path

from models.files import resolve_path
from models.labellers import load_labeller
from models.t2i import is_text_to_image
from utils.app.cli import input_path, output_path, read_prompts
from utils.app.runtime import pick_device
from utils.config import RunConfig
from utils.sampling.pipeline import load_pipeline
from utils.sampling.seeds import parse_seeds


def check_extraction(cfg: dict, args) -> Path:
    """The extraction's flags and output folder, before anything is loaded or written; returns
    the output folder."""
    from utils.data.extract import check_savepath
    family = RunConfig.of(cfg, require_model=False).family       # the flags first: the model is checked on loading
    if args.just_precompute and is_text_to_image(family) and family != "sd":
        raise ValueError(f"--just_precompute (DDIM inversion of image folders) is built for the sd family; the "
                         f"{family} family's is not yet: use --extract_pseudo N with a labeller")
    if not args.savepath:
        raise ValueError("extraction needs --savepath (the folder the h-vectors go to)")
    if args.just_precompute and args.extract_pseudo is not None:
        raise ValueError("give --just_precompute True (DDIM inversion of image folders) or --extract_pseudo N "
                         "(generated samples), not both")
    if not args.just_precompute and (args.extract_pseudo is None or args.extract_pseudo < 1):
        raise ValueError(f"--extract_pseudo N: N must be >= 1, the number of samples to draw and label "
                         f"(got {args.extract_pseudo})")
    if args.just_precompute and (not args.test_path_one or not args.attribute):
        raise ValueError("--just_precompute needs --test_path_one (class folders) and --attribute")
    out = output_path(args.savepath)
    check_savepath(out)
    return out


def extract(cfg: dict, args) -> int:
    from utils.data.extract import extract_from_folders, extract_pseudo_labelled
    out = check_extraction(cfg, args)
    rc = RunConfig.of(cfg)
    if rc.text_to_image:
        return extract_text_to_image(cfg, args, out)
    device = pick_device(args.device)
    if args.just_precompute:
        root = resolve_path(input_path(args.test_path_one))
        pipe = load_pipeline(cfg, device, args.steps, 0.0)
        meta = {"model": pipe.model_id, "config": rc.name}
        extract_from_folders(pipe.sampler, root, args.attribute, out, meta, args.bs_test, device)
    else:
        if not rc.labeller:
            raise ValueError(f"config {rc.name} names no labeller for --extract_pseudo: "
                             f"pass --labeller NAME_OR_FILE")
        seeds = parse_seeds(args.seeds, args.extract_pseudo, args.seed)
        pipe = load_pipeline(cfg, device, args.steps, args.eta)
        meta = {"model": pipe.model_id, "config": rc.name, "labeller": rc.labeller}
        extract_pseudo_labelled(pipe.sampler, seeds, load_labeller(rc.labeller), out, meta, args.bs_test, device)
    print(f"h-vectors in {out}")
    return 0


def extract_text_to_image(cfg: dict, args, out: Path) -> int:
    """--extract_pseudo N on a text-to-image model: the seeds' images over --prompts / --prompt,
    labelled by the config's labeller (e.g. CLIP zero-shot); --just_precompute: the images of
    --test_path_one's class folders, inverted under --prompt (default: the empty prompt). Under
    torchrun each rank extracts its share of the shards."""
    from utils.app.runtime import process_group
    from utils.data.extract_t2i import extract_t2i_folders, extract_t2i_pseudo
    from utils.sampling.text2image import load_t2i
    rc = RunConfig.of(cfg)
    if not args.just_precompute:
        if not rc.labeller:
            raise ValueError(f"config {rc.name} names no labeller for --extract_pseudo: "
                             f"set labeller: (e.g. a clip spec) or pass --labeller FILE")
        prompts = read_prompts(cfg, args)
        seeds = parse_seeds(args.seeds, args.extract_pseudo, args.seed)
        labeller = load_labeller(rc.labeller)
    with process_group(args.device) as (rank, world, device):          # one process unless torchrun
        if args.just_precompute:
            pipe = load_t2i(cfg, device, args.steps, 0.0, 1.0, args.scheduler or "ddim")
            extract_t2i_folders(pipe, resolve_path(input_path(args.test_path_one)), args.attribute, out,
                                {"model": pipe.model_id, "config": rc.name}, args.bs_test,
                                args.prompt or "", rank, world)
        else:
            pipe = load_t2i(cfg, device, args.steps, args.eta, args.cfg, args.scheduler)
            negative = (args.negative_prompt if args.negative_prompt is not None else rc.negative_prompt) or None
            extract_t2i_pseudo(pipe, prompts, seeds, labeller, out,
                               {"model": pipe.model_id, "config": rc.name, "labeller": rc.labeller},
                               args.bs_test, negative, rank, world)
    if rank == 0:
        print(f"h-vectors in {out}")
    return 0
