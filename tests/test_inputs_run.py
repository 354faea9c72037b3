"""main.py's generation and demo commands: the original's flags translated exactly, and every bad
input a one-line error (exit 2) before anything is written, an existing run folder unchanged.

Each test names the input case it checks; the embedded digits models keep
the runs tiny (2-4 images)."""
import json
import os
from pathlib import Path

import pytest
import yaml

import main as entry
from models.files import resolve_path
from utils.app.cli import build_parser

FAST = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2", "--steps", "5"]
GUIDED = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2"]       # the ADP's 50-step grid
T2I = ["--config", "configs/digits16_t2i.yml", "--device", "cpu", "--n_test_img", "2", "--bs_test", "2",
       "--steps", "3"]


def run(capsys, argv):
    capsys.readouterr()
    rc = entry.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return rc, out.err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_run(tmp_path):
    out = tmp_path / "OLD"
    assert entry.main(["--mode", "vanilla", "--exp", str(out), *FAST]) == 0
    return out


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


# ---- the original's flags ------------------------------------------------------------------------
def test_scale_list_gives_one_scale_per_attribute_in_order(capsys, tmp_path):
    rc, err = run(capsys, ["--mode", "distribution", "--target", "parity=0.5,magnitude=0.5", "--preset", "paper",
                           "--scale", "1500,700", "--exp", tmp_path / "r", *GUIDED])
    assert rc == 0, err
    assert record(tmp_path / "r")["resolved"]["guidance"]["scales"] == {"parity": 1500.0, "magnitude": 700.0}


def test_male_indexes_the_joint_classes_of_the_selected_attributes(capsys, tmp_path):
    rc, err = run(capsys, ["--sample", "True", "--attribute_list", "1,1,0", "--male", "2", "--no-check",
                           "--exp", tmp_path / "r", *GUIDED])
    assert rc == 0, err
    g = record(tmp_path / "r")["resolved"]["guidance"]
    assert g["classes"] == {"parity": 1, "magnitude": 0}
    assert g["guided_targets"] == {"parity": [0.0, 1.0], "magnitude": [1.0, 0.0]}


# ---- bad configs: the file and the key named, nothing written --------------------------------------
@pytest.mark.parametrize("text, words", [
    ("", "has no model: section"),
    ("name: x\n", "has no model: section"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("model: [1, 2]\n", "model: must be a mapping"),
    ("SAMPLING: {steps: fifty}", "sampling.steps is 'fifty'"),
    ("SAMPLING: {eta: 7}", "sampling.eta is 7"),
    ("SAMPLING: {cfg: 0.5}", "sampling.cfg is 0.5"),
])
def test_a_broken_config_names_its_file_and_key(capsys, tmp_path, words, text):
    if text.startswith("SAMPLING"):
        cfg = yaml.safe_load(resolve_path("configs/digits16.yml").read_text())
        cfg["sampling"].update(yaml.safe_load(text)["SAMPLING"])
        text = yaml.safe_dump(cfg)
    path = tmp_path / "bad.yml"
    path.write_text(text)
    rc, err = run(capsys, ["--config", path, "--exp", tmp_path / "out", *FAST])
    assert rc == 2 and words in err and str(path) in err, err
    assert not (tmp_path / "out").exists()


# ---- bad flags: exit 2, the old run unchanged --------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--n_test_img", "1000000000000"], "--n_test_img 1000000000000: must be in [1,"),
    (["--seeds", "0-99999999999"], "0 <= a <= b < 2**32"),
    (["--cfg", "0.5"], "must be >= 1"),
    (["--cfg", "0"], "must be >= 1"),
    (["--extract_pseudo", "0", "--savepath", "X"], "--extract_pseudo 0: must be in [1,"),
    (["--extract_pseudo", "-5", "--savepath", "X"], "--extract_pseudo -5: must be in [1,"),
    (["--mode", "distribution", "--target", "parity*parity=uniform"], "names ['parity'] twice"),
    (["--prompt", "a digit"], "text-to-image flag"),
    (["--scheduler", "pndm"], "text-to-image flag"),
    (["--mode", "distribution", "--target", "parity=0.5", "--scale", "1,2"], "2 values for 1"),
    (["--overwrite", "--resume"], "contradict"),
])
def test_bad_flags_exit_2_and_leave_the_old_run(capsys, old_run, argv, words):
    before = snapshot(old_run)
    rc, err = run(capsys, [*FAST, *argv, "--exp", old_run])
    assert rc == 2 and words in err, err
    assert snapshot(old_run) == before


def test_exp_inside_a_file_says_it_is_a_file(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    rc, err = run(capsys, [*FAST, "--exp", tmp_path / "afile" / "sub"])
    assert rc == 2 and "is a file" in err and "permission" not in err, err


def test_a_symlink_loop_is_an_error_not_a_traceback(capsys, tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    for flag in ("--exp", "--config", "--adp", "--checkpoint"):
        argv = [*FAST, flag, tmp_path / "a"] + ([] if flag == "--exp" else ["--exp", tmp_path / "o"])
        rc, err = run(capsys, argv)
        assert rc == 2 and str(tmp_path / "a") in err, (flag, err)
    assert not (tmp_path / "o").exists()


def test_a_scale_that_overflows_h_is_an_error_and_leaves_no_folder(capsys, tmp_path):
    out = tmp_path / "deep" / "run"
    rc, err = run(capsys, ["--preset", "paper", "--scale", "1e30", "--mode", "distribution", "--target",
                           "parity=0.5", "--exp", out, *GUIDED])
    assert rc == 2 and "guidance diverged" in err and "lower --scale" in err, err
    assert not (tmp_path / "deep").exists()


def test_resume_with_other_seeds_is_refused(capsys, old_run):
    before = snapshot(old_run)
    rc, err = run(capsys, [*FAST, "--resume", "--seed", "500", "--exp", old_run])
    assert rc == 2 and "other seeds" in err and "0, 1" in err, err
    assert snapshot(old_run) == before
    rc, err = run(capsys, [*FAST[:-4], "--n_test_img", "3", "--bs_test", "2", "--steps", "5", "--resume",
                           "--exp", old_run])                  # more seeds: the run goes on
    assert rc == 0, err
    assert record(old_run)["seeds"] == [0, 1, 2] and (old_run / "000002.png").exists()
    for name in ("000000.png", "000001.png"):
        assert (old_run / name).read_bytes() == before[name]


def test_refine_within_preserve_is_a_choice():
    assert build_parser().parse_args(["--refine_within", "preserve"]).refine_within == "preserve"


# ---- text-to-image runs ------------------------------------------------------------------------------
def test_an_empty_prompt_is_the_empty_prompt(capsys, tmp_path):
    rc, err = run(capsys, [*T2I, "--prompt", "", "--exp", tmp_path / "r"])
    assert rc == 0, err
    assert record(tmp_path / "r")["resolved"]["text"]["prompt"] == ""


def test_prompts_into_a_single_prompt_run_are_refused(capsys, tmp_path):
    single = tmp_path / "single"
    assert run(capsys, [*T2I, "--exp", single])[0] == 0
    before = snapshot(single)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit\na small digit\n")
    rc, err = run(capsys, [*T2I, "--prompts", prompts, "--exp", single, "--resume"])
    assert rc == 2 and "not a run of several prompts" in err, err
    assert snapshot(single) == before


def test_every_prompts_folder_is_checked_before_the_first_is_written(capsys, tmp_path):
    root = tmp_path / "multi"
    (root / "p001").mkdir(parents=True)
    (root / "p001" / "notes.txt").write_text("mine")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit\na small digit\n")
    rc, err = run(capsys, [*T2I, "--prompts", prompts, "--exp", root])
    assert rc == 2 and "p001" in err, err
    assert sorted(p.name for p in root.iterdir()) == ["p001"]


# ---- the demo ----------------------------------------------------------------------------------------
@pytest.fixture
def demo_cfg(tmp_path):
    cfg = yaml.safe_load(resolve_path("configs/digits16.yml").read_text())
    cfg["demo"]["n"] = 3
    path = tmp_path / "demo.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("argv, n, exp", [
    ([], 3, "runs/demo"),                                         # the config's demo: n, the demo's folder
    (["--n_test_img", "100", "--exp", "runs/generate"], 100, "runs/generate"),   # given: honoured, whatever
])                                                                # the defaults of a generation run are
def test_demo_honours_every_flag_given_even_at_a_generation_runs_default(capsys, tmp_path, demo_cfg,
                                                                          monkeypatch, argv, n, exp):
    import diffusion_latent
    from utils.config import DEFAULT_N_IMAGES
    assert DEFAULT_N_IMAGES == 100
    runs = []

    def generate(cfg, args, mode):
        runs.append((args.seeds, args.exp))
        raise ValueError("stop here")
    monkeypatch.setattr(diffusion_latent, "generate", generate)
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, ["--config", demo_cfg, "--demo", "--device", "cpu", *argv])
    assert rc == 2 and "stop here" in err, err
    seeds, out = runs[0]
    assert seeds == ",".join(map(str, range(n)))
    assert Path(out) == tmp_path / exp / "distribution"


def test_demo_refuses_a_folder_holding_a_run(capsys, old_run, demo_cfg):
    before = snapshot(old_run)
    for extra in ([], ["--overwrite"]):
        rc, err = run(capsys, ["--config", demo_cfg, "--demo", "--device", "cpu", "--exp", old_run, *extra])
        assert rc == 2 and "holds other files" in err, err
    assert snapshot(old_run) == before


def test_demo_steps_the_adp_cannot_guide_fail_before_anything_is_written(capsys, tmp_path, demo_cfg):
    rc, err = run(capsys, ["--config", demo_cfg, "--demo", "--device", "cpu", "--steps", "5",
                           "--exp", tmp_path / "d"])
    assert rc == 2 and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()


def test_demo_takes_an_explicit_n_and_labels_a_grid_of_every_image(capsys, tmp_path, demo_cfg):
    from PIL import Image
    assert build_parser().parse_args([]).n_test_img is None          # "not given" is not a number
    rc, err = run(capsys, ["--config", demo_cfg, "--demo", "--device", "cpu", "--n_test_img", "2",
                           "--exp", tmp_path / "d"])
    assert rc == 0, err
    for mode in ("vanilla", "distribution"):
        assert sorted(p.name for p in (tmp_path / "d" / mode).glob("0*.png")) == ["000000.png", "000001.png"]
    # two panels of one row of two 16 px images (pad 1, x3) under a 14 px label band, 12 px apart
    side = Image.open(tmp_path / "d" / "side_by_side.png")
    assert side.size == (2 * 3 * (2 * 17 + 1) + 12, 3 * 18 + 14)
    band = __import__("numpy").asarray(side.convert("L"))[:14]
    assert (band < 128).any()                                         # the labels are written
    rc, err = run(capsys, ["--config", demo_cfg, "--demo", "--device", "cpu", "--exp", tmp_path / "d"])
    assert rc == 2 and "--overwrite" in err                           # an earlier demo: replaced only if asked
    rc, err = run(capsys, ["--config", demo_cfg, "--demo", "--device", "cpu", "--exp", tmp_path / "d",
                           "--overwrite"])
    assert rc == 0, err
    assert len(list((tmp_path / "d" / "vanilla").glob("0*.png"))) == 3   # the config's demo: n
