"""main.py's extraction command (script_extract_he.sh): h-vectors from labelled image folders
(DDIM inversion) or from generated samples labelled by a classifier."""
from __future__ import annotations

from models.files import resolve_path
from models.labellers import load_labeller
from utils.app.cli import input_path, output_path, read_prompts
from utils.app.runtime import pick_device
from utils.sampling.pipeline import load_pipeline
from utils.sampling.seeds import parse_seeds


def extract(cfg: dict, args) -> int:
    from utils.data.extract import extract_from_folders, extract_pseudo_labelled
    if not args.savepath:
        raise ValueError("extraction needs --savepath (the folder the h-vectors go to)")
    device = pick_device(args.device)
    if (cfg.get("model") or {}).get("family") == "sd":
        return extract_text_to_image(cfg, args, device)
    pipe = load_pipeline(cfg, device, args.steps, 0.0 if args.just_precompute else args.eta)
    meta = {"model": pipe.model_id, "config": cfg.get("name")}
    out = output_path(args.savepath)
    if args.just_precompute:
        if not args.test_path_one or not args.attribute:
            raise ValueError("--just_precompute needs --test_path_one (class folders) and --attribute")
        extract_from_folders(pipe.sampler, resolve_path(input_path(args.test_path_one)), args.attribute, out,
                             meta, args.bs_test, device)
    else:
        if not cfg.get("labeller"):
            raise ValueError(f"config {cfg.get('name')} names no labeller for --extract_pseudo: "
                             f"pass --labeller NAME_OR_FILE")
        seeds = parse_seeds(args.seeds, args.extract_pseudo, args.seed)
        extract_pseudo_labelled(pipe.sampler, seeds, load_labeller(cfg["labeller"]), out,
                                {**meta, "labeller": cfg["labeller"]}, args.bs_test, device)
    print(f"h-vectors in {out}")
    return 0


def extract_text_to_image(cfg: dict, args, device) -> int:
    """--extract_pseudo N on a text-to-image model: the seeds' images over --prompts / --prompt,
    labelled by the config's labeller (e.g. CLIP zero-shot)."""
    from utils.data.extract_t2i import extract_t2i_pseudo
    from utils.sampling.text2image import load_t2i
    if args.just_precompute:
        raise ValueError("--just_precompute (DDIM inversion of image folders) is not available for "
                         "text-to-image models yet; use --extract_pseudo N with a labeller")
    if not cfg.get("labeller"):
        raise ValueError(f"config {cfg.get('name')} names no labeller for --extract_pseudo: "
                         f"set labeller: (e.g. a clip spec) or pass --labeller FILE")
    prompts = read_prompts(cfg, args)
    labeller = load_labeller(cfg["labeller"])
    pipe = load_t2i(cfg, device, args.steps, args.eta, args.cfg, args.scheduler)
    seeds = parse_seeds(args.seeds, args.extract_pseudo, args.seed)
    negative = (args.negative_prompt if args.negative_prompt is not None else cfg.get("negative_prompt")) or None
    out = output_path(args.savepath)
    extract_t2i_pseudo(pipe, prompts, seeds, labeller, out,
                       {"model": pipe.model_id, "config": cfg.get("name"), "labeller": cfg["labeller"]},
                       args.bs_test, negative)
    print(f"h-vectors in {out}")
    return 0
