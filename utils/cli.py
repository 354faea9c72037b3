"""Command line of main.py: argument parsing, validation and dispatch (the work lives elsewhere)."""
from __future__ import annotations

import argparse
import logging
import math
import sys

import torch

from models.loader import CheckpointError
from models.adp import ClassifierMismatchError
from utils.config import DEFAULT_CONFIG, load_config, with_overrides
from utils.runtime import init_distributed, pick_device, setup_logging
from utils.seeds import parse_seeds

log = logging.getLogger("main")


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description=sys.modules["__main__"].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and run")
    g.add_argument("--config", default=DEFAULT_CONFIG, help="YAML preset (default: the embedded digits model)")
    g.add_argument("--checkpoint", help="override model.checkpoint of the config")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--exp", default="runs/generate", help="output folder")
    g.add_argument("--n_test_img", type=int, default=100, help="number of images to generate")
    g.add_argument("--bs_test", type=int, default=100, help="batch size (the unit of distribution guidance)")
    g.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed+k")
    g.add_argument("--seeds", help="explicit seeds, e.g. 0-999 or 3,5,8 (overrides --seed/--n_test_img)")
    g.add_argument("--steps", type=int, help="DDIM steps (default: config sampling.steps)")
    g.add_argument("--eta", type=float, help="DDIM eta (default: config sampling.eta)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--resume", action="store_true", help="continue a run, skipping images already written")
    g = p.add_argument_group("guidance")
    g.add_argument("--mode", choices=["vanilla", "sample", "distribution"])
    g.add_argument("--vanilla_generation", type=str2bool, help="original flag: True = --mode vanilla")
    g.add_argument("--sample", type=str2bool, help="original flag: True = sample guidance, False = distribution")
    g.add_argument("--attribute_list", help="original flag: one 0/1 switch per ADP attribute, e.g. 1,1,0")
    g.add_argument("--male", type=float, help="original flag: class index (sample) or fraction of class 1 (distribution)")
    g.add_argument("--target", help="parity=0.5 | digit=uniform | race=0.25:0.25:0.25:0.25 | (sample) parity=odd"
                   " | (joint, first attribute slowest) 'parity*magnitude=0.25:0.25:0.25:0.25'")
    g.add_argument("--scale", help="guidance scale: one number, or per attribute: parity=2,magnitude=1")
    g.add_argument("--adp", help="ADP checkpoint (default: config adp)")
    g.add_argument("--guide_steps", help="guided step indices start:end (default: config guidance)")
    g.add_argument("--asymmetric", action="store_true", help="Asyrp's asymmetric reverse process")
    g.add_argument("--running_balance", action=argparse.BooleanOptionalAction, default=None,
                   help="distribution guidance steers the whole run: the estimate includes the "
                        "samples of earlier batches (default: config guidance.running_balance)")
    g.add_argument("--estimator", choices=["auto", "quota", "soft"],
                   help="distribution guidance's batch estimate: quota (ours) or soft (the paper's "
                        "mean of the ADP's softmax); auto: quota for one attribute, soft for "
                        "several or a joint target; default: config guidance.estimator")
    g.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="guide a coarse target through a finer head that nests it (config "
                        "guidance.refine, e.g. parity through digit; default: on where configured)")
    g.add_argument("--check", help="image classifier that checks finished samples (digits_svc, a "
                   "judge file, or none): the running balance counts its classes, sample guidance "
                   "redraws the images outside their class; default: config guidance.check")
    g.add_argument("--evaluate", action="store_true", help="judge the generated images (config judge)")
    g = p.add_argument_group("h-vector extraction (script_extract_he.sh)")
    g.add_argument("--just_precompute", type=str2bool, default=False, help="extract h from image folders")
    g.add_argument("--test_path_one", help="folder with one sub-folder of images per class")
    g.add_argument("--attribute", help="attribute name for --test_path_one (e.g. gender)")
    g.add_argument("--savepath", help="output folder of the extraction")
    g.add_argument("--extract_pseudo", type=int, metavar="N", help="sample N images, record h, pseudo-label")
    g.add_argument("--labeller", default="digits_svc", help="digits_svc, or a judge file (.pt / .onnx)")
    p.add_argument("--demo", action="store_true", help="vanilla vs balanced on the embedded default")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_mode(args) -> str:
    """--mode, or the original boolean flags."""
    if args.mode:
        return args.mode
    if args.vanilla_generation is None and args.sample is None:
        return "vanilla"
    if args.vanilla_generation:
        return "vanilla"
    return "sample" if args.sample else "distribution"


def parse_scales(spec: str | None, attrs: list[str], defaults: dict) -> dict[str, float]:
    """'2' -> every attribute; 'parity=2,digit=1' -> per attribute; unset -> config defaults."""
    out = {a: float(defaults.get(a, defaults.get("default", 1.0))) for a in attrs}
    if spec is None:
        return out
    for part in str(spec).split(","):
        name, _, val = part.rpartition("=")
        try:
            x = float(val)
        except ValueError:
            raise ValueError(f"--scale {spec!r}: {val!r} is not a number") from None
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"--scale {spec!r}: must be a finite number >= 0")
        for a in ([name] if name else attrs):
            if a not in out:
                raise ValueError(f"--scale names attribute {a!r}, which is not guided ({attrs})")
            out[a] = x
    return out


def parse_fraction_vector(attr: str, value: str, classes: list[str]) -> torch.Tensor:
    """Target fractions for one attribute: 'uniform', 'p' (binary: class 1) or 'p0:p1:...'."""
    k = len(classes)
    if value == "uniform":
        return torch.full((k,), 1.0 / k)
    try:
        parts = [float(v) for v in value.replace("/", ":").split(":")]
    except ValueError:
        raise ValueError(f"target for {attr}: {value!r} is not a number or a list p0:p1:...") from None
    if len(parts) == 1 and k == 2:
        parts = [1 - parts[0], parts[0]]
    if len(parts) != k:
        raise ValueError(f"target for {attr} has {len(parts)} fractions but the attribute has {k} "
                         f"classes {classes}: give {k} values separated by ':'")
    vec = torch.tensor(parts, dtype=torch.float32)
    if (vec < 0).any():
        raise ValueError(f"target for {attr}: fractions must be >= 0, got {parts}")
    if abs(float(vec.sum()) - 1) > 1e-4:
        raise ValueError(f"target for {attr}: fractions must sum to 1, got {parts} (sum {float(vec.sum()):.4f})")
    if (vec == 0).any():
        vec = (vec + 1e-3) / (vec + 1e-3).sum()      # chi-square needs p_ref > 0
    return vec


def joint_classes(key: str, adp_attrs: dict[str, list[str]]) -> list[str]:
    """Class names of a target key: an attribute's, or for 'a*b' the product 'a0/b0', 'a0/b1', ..."""
    names = [[]]
    for a in key.split("*"):
        names = [n + [c] for n in names for c in adp_attrs[a]]
    return ["/".join(n) for n in names]


def parse_targets(args, mode: str, adp_attrs: dict[str, list[str]]) -> dict[str, str]:
    """{attribute: raw target string} from --target, or --attribute_list + --male."""
    if args.target:
        pairs = {}
        for part in args.target.split(","):
            if "=" not in part:
                raise ValueError(f"--target {args.target!r}: expected attr=value pairs, e.g. parity=0.5")
            a, v = part.split("=", 1)
            pairs[a.strip()] = v.strip()
    elif args.attribute_list:
        switches = [s.strip() for s in args.attribute_list.split(",")]
        names = list(adp_attrs)
        if any(s not in ("0", "1") for s in switches) or "1" in switches[len(names):]:
            raise ValueError(f"--attribute_list {args.attribute_list!r}: one 0/1 switch per ADP "
                             f"attribute, in order {names}")
        if args.male is None:
            raise ValueError("--attribute_list needs --male (class index, or fraction of class 1)")
        pairs = {names[i]: (str(int(args.male)) if mode == "sample" else str(args.male))
                 for i, s in enumerate(switches) if s == "1" and i < len(names)}
    else:
        raise ValueError(f"{mode} guidance needs --target (e.g. parity=0.5) or --attribute_list with --male")
    unknown = [a for k in pairs for a in k.split("*") if a not in adp_attrs]
    if unknown:
        raise ValueError(f"the ADP has no attribute {unknown}; it has {list(adp_attrs)}")
    if not pairs:
        raise ValueError("no attribute selected for guidance")
    return pairs


def sample_class_index(attr: str, value: str, classes: list[str]) -> int:
    if value in classes:
        return classes.index(value)
    try:
        c = int(float(value))
    except ValueError:
        raise ValueError(f"sample target for {attr}: {value!r} is neither a class {classes} nor an index") from None
    if not 0 <= c < len(classes):
        raise ValueError(f"sample target for {attr}: class index {c} out of range for {classes}")
    return c


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        from utils import commands
        cfg = with_overrides(load_config(args.config), {"model.checkpoint": args.checkpoint,
                                                        "adp": args.adp})
        if args.demo:
            device = pick_device(args.device)
            return commands.demo(cfg, device, args)
        if args.just_precompute or args.extract_pseudo:
            return commands.extract(cfg, pick_device(args.device), args)
        if args.bs_test < 1 or args.n_test_img < 1:
            raise ValueError("--bs_test and --n_test_img must be >= 1")
        seeds = parse_seeds(args.seeds, args.n_test_img, args.seed)
        rank, world, device = init_distributed(args.device)      # one process unless torchrun
        try:
            return commands.generate(cfg, device, args, resolve_mode(args), seeds, rank, world)
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError,
            ClassifierMismatchError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
