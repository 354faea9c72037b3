"""Bad input and faults: every file is read without running code, every bad input gets a one-line
message and exit 2 before anything is written, and a run folder is never lost or mixed.

Each test names the input or fault case it checks. The embedded digits model is
used with tiny runs (2-4 images)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as entry
import multi_classifier
from models.adp import ADP
from models.files import file_sha256, resolve_path
from utils.sampling.diffusion import DDIMSampler, ddim_timesteps

ROOT = Path(__file__).resolve().parent.parent
CKPT = "pretrained/digits16_ddpm.pt"
FAST = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2", "--steps", "5"]
GUIDED = ["--device", "cpu", "--n_test_img", "2", "--bs_test", "2"]       # the ADP's 50-step grid


def load_script(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Evil:
    """Unpickling this creates a marker file (as a pickle could run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"kind": "balancing-act/adp-v1", "state_dict": {}, "x": Evil(marker)}, path)
    assert not marker.exists()
    return path, marker


def run(capsys, fn, argv):
    capsys.readouterr()
    rc = fn(argv)
    return rc, capsys.readouterr().err


# ---- 1. no code runs from a checkpoint -----------------------------------------------------------
def test_pickle_never_runs_through_any_entry_point(capsys, tmp_path, evil):
    path, marker = evil
    out = str(tmp_path / "out")
    shard_dir = tmp_path / "h"
    shard_dir.mkdir()
    (shard_dir / "meta.json").write_text(json.dumps({"timesteps": [1], "h_shape": [1], "attributes": {}}))
    os.link(path, shard_dir / "shard_00000.pt")
    judge_cfg = tmp_path / "judge.yml"
    text = resolve_path("configs/digits16.yml").read_text().replace("judge: pretrained/digits16_judge.pt",
                                                                       f"judge: {path}")
    judge_cfg.write_text(text)
    cases = {
        "model checkpoint": (entry.main, ["--mode", "vanilla", "--checkpoint", str(path), "--exp", out, *FAST]),
        "ADP": (entry.main, ["--mode", "distribution", "--target", "parity=0.5", "--adp", str(path), "--exp", out, *GUIDED]),
        "judge (--evaluate)": (entry.main, ["--config", str(judge_cfg), "--mode", "vanilla", "--evaluate", "--exp", out, *FAST]),
        "check labeller": (entry.main, ["--mode", "sample", "--target", "parity=odd", "--labeller", str(path), "--exp", out, *GUIDED]),
        "extraction labeller": (entry.main, ["--extract_pseudo", "2", "--labeller", str(path), "--savepath", out, *FAST]),
        "extraction shards": (multi_classifier.main, ["--data", str(shard_dir), "--out", str(tmp_path / "a.pt")]),
        "original classifier": (multi_classifier.main, ["--import_original", str(path), "--attribute", "g",
                                                        "--config", "configs/celeba_hq_p2.yml", "--out", str(tmp_path / "b.pt")]),
        "ADP to complete": (multi_classifier.main, ["--directions_from", str(shard_dir), "--adp", str(path),
                                                    "--out", str(tmp_path / "c.pt")]),
        "training state": (load_script("scripts/train_digits_ddpm.py").main,
                           ["--state", str(path), "--steps", "1", "--out", str(tmp_path / "d.pt"), "--device", "cpu"]),
        "pixel classifier (bench)": (load_script("bench/pixel_guidance_sweep.py").main,
                                     ["--clf", str(path), "--n", "2", "--device", "cpu", "--out", out]),
        "ADP (bench)": (load_script("bench/guidance_eval.py").main, ["--adp", str(path), "--n", "2", "--device", "cpu",
                                                                    "--out", out]),
    }
    for name, (fn, argv) in cases.items():
        rc, err = run(capsys, fn, argv)
        assert not marker.exists(), f"{name}: the pickle ran"
        assert rc == 2 and "error:" in err and "Traceback" not in err, (name, rc, err[-400:])
        assert str(path) in err or "evil.pt" in err or "shard_00000" in err, (name, err)


# ---- 2. NaN and bad numbers are refused before anything is touched -------------------------------
@pytest.fixture
def old_run(tmp_path):
    out = tmp_path / "OLD"
    assert entry.main(["--mode", "vanilla", "--exp", str(out), *FAST]) == 0
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("argv, message", [
    (["--mode", "distribution", "--target", "parity=nan"], "finite"),
    (["--mode", "distribution", "--target", "parity=inf"], "finite"),
    (["--mode", "distribution", "--target", "parity=nan", "--estimator", "soft", "--no-refine", "--no-check"], "finite"),
    (["--mode", "vanilla", "--steps", "0"], "must be >= 1"),
    (["--mode", "vanilla", "--eta", "-2"], "eta must be in [0, 1]"),
    (["--mode", "distribution", "--target", "parity=0.5", "--guide_steps", "40:10"], "are empty"),
    (["--mode", "distribution", "--target", "parity=0.9,parity=0.1"], "names 'parity' twice"),
    (["--mode", "sample", "--attribute_list", "1,0,0", "--male", "0.7"], "must be a class index"),
    (["--mode", "vanilla", "--seed", "-5"], "seeds must be in [0, 2**32)"),
    (["--mode", "vanilla", "--seed", "99999999999999999999"], "seeds must be in [0, 2**32)"),
])
def test_bad_numbers_exit_2_and_leave_the_old_run(capsys, old_run, argv, message):
    before = _snapshot(old_run)
    rc, err = run(capsys, entry.main, [*GUIDED, *argv, "--exp", str(old_run), "--overwrite"])
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert _snapshot(old_run) == before


@pytest.mark.parametrize("flag", ["--eta", "--male"])
def test_nan_flags_are_argparse_errors(capsys, flag):
    with pytest.raises(SystemExit) as e:
        entry.main(["--mode", "vanilla", flag, "nan"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


# ---- 3. --resume continues only the same run -----------------------------------------------------
def test_resume_refuses_another_run_listing_the_differences(capsys, old_run):
    before = _snapshot(old_run)
    rc, err = run(capsys, entry.main, ["--mode", "distribution", "--target", "parity=0.5", "--exp", str(old_run),
                                       "--resume", *GUIDED])
    assert rc == 2 and "holds another run" in err and "mode:" in err and "guidance:" in err and "steps: 5 -> 50" in err
    assert _snapshot(old_run) == before
    rc, err = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(old_run), "--resume",
                                       "--device", "cpu", "--n_test_img", "2", "--bs_test", "2", "--steps", "6"])
    assert rc == 2 and "steps: 5 -> 6" in err


def test_resume_of_the_same_run_redoes_broken_images_only(capsys, old_run):
    good, broken = old_run / "000000.png", old_run / "000001.png"
    full = broken.read_bytes()
    broken.write_bytes(full[: len(full) // 2])                  # a crash left half a file
    mtime = good.stat().st_mtime_ns
    assert entry.main(["--mode", "vanilla", "--exp", str(old_run), "--resume", *FAST]) == 0
    assert good.stat().st_mtime_ns == mtime and broken.read_bytes() == full
    rec = json.loads((old_run / "run.json").read_text())
    assert rec["status"] == "complete" and rec["images_generated_now"] == 1


# ---- 4. --overwrite removes only a run's own files -----------------------------------------------
def test_overwrite_refuses_a_folder_with_other_files(capsys, old_run):
    (old_run / "thesis.tex").write_text("x")
    before = _snapshot(old_run)
    rc, err = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(old_run), "--overwrite", *FAST])
    assert rc == 2 and "thesis.tex" in err
    assert _snapshot(old_run) == before


def test_overwrite_replaces_a_run(old_run):
    (old_run / "000007.png").write_bytes(b"old image of another length of run")
    assert entry.main(["--mode", "vanilla", "--exp", str(old_run), "--overwrite", *FAST]) == 0
    assert sorted(p.name for p in old_run.iterdir()) == ["000000.png", "000001.png", "grid.png", "run.json"]


def test_scripts_do_not_pass_overwrite_unless_asked():
    for script in ("s_u_r.sh", "script_extract_he.sh", "train_adp.sh"):
        text = (ROOT / script).read_text()
        calls = [ln for ln in text.splitlines() if "--overwrite" in ln.split("#")[0]]
        assert all("$overwrite" in ln or "${overwrite" in ln for ln in calls), (script, calls)


# ---- 5. a lock for the length of a run -----------------------------------------------------------
def test_a_running_run_holds_the_folder(capsys, old_run):
    import socket
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (old_run / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        before = _snapshot(old_run)
        rc, err = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(old_run), "--resume", *FAST])
        assert rc == 2 and f"process {holder.pid}" in err
        assert _snapshot(old_run) == before
    finally:
        holder.kill()
        holder.wait()
    rc, _ = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(old_run), "--resume", *FAST])
    assert rc == 0 and not (old_run / ".lock").exists()       # a stale lock is taken over, then freed


# ---- 6. images are written atomically ------------------------------------------------------------
def test_images_are_written_under_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    import numpy as np
    from utils.sampling import images
    seen = []
    real = os.replace

    def spy(a, b):
        seen.append((Path(a).name, Path(b).name))
        return real(a, b)
    monkeypatch.setattr(os, "replace", spy)
    images.save_images(tmp_path, [3], np.zeros((1, 4, 4, 1), np.uint8))
    assert seen and seen[0][1] == "000003.png" and seen[0][0].startswith(".") and seen[0][0] != "000003.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.png"]


# ---- 7. seeds, file names and evaluation agree ---------------------------------------------------
def test_large_seeds_name_and_evaluate_every_image(tmp_path):
    out = tmp_path / "big"
    assert entry.main(["--mode", "vanilla", "--exp", str(out), "--seeds", "4294967294,4294967295",
                       "--evaluate", "--device", "cpu", "--bs_test", "2", "--steps", "5"]) == 0
    assert sorted(p.name for p in out.glob("4*.png")) == ["4294967294.png", "4294967295.png"]
    assert json.loads((out / "eval.json").read_text())["n"] == 2


# ---- 8. messages, not tracebacks -----------------------------------------------------------------
def _write_adp(path, sha=None, drop_hash=False):
    adp = ADP((64, 4, 4), ddim_timesteps(1000, 50), {"parity": ["even", "odd"]})
    model = {"config": "digits16", "checkpoint": CKPT}
    if not drop_hash:
        model["checkpoint_sha256"] = sha or file_sha256(resolve_path(CKPT))
    adp.save(path, model, {"source": "test"}, {})
    return path


@pytest.mark.parametrize("flag", ["--checkpoint", "--adp"])
@pytest.mark.parametrize("content", [b"this is a text file\n", "truncated"])
def test_unreadable_checkpoints_are_named(capsys, tmp_path, flag, content):
    bad = tmp_path / "bad.pt"
    if content == "truncated":
        good = resolve_path(CKPT if flag == "--checkpoint" else "pretrained/digits16_adp.pt").read_bytes()
        content = good[: len(good) // 3]
    bad.write_bytes(content)
    rc, err = run(capsys, entry.main, ["--mode", "distribution", "--target", "parity=0.5", flag, str(bad),
                                       "--exp", str(tmp_path / "o"), *GUIDED])
    assert rc == 2 and str(bad) in err and "cannot be read as" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("model: [\n", "is not valid YAML"),
    ("model: {family: adm, checkpoint: pretrained/digits16_ddpm.pt, image_size: 16, in_channels: 1, out_channels: 1,"
     " model_channels: 32, channel_mult: [1, 2, 2], num_res_blocks: two}\ndiffusion: {beta_schedule: linear}\n",
     "does not describe a valid adm network"),
])
def test_bad_configs_are_named(capsys, tmp_path, yaml_text, message):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml_text)
    rc, err = run(capsys, entry.main, ["--config", str(cfg), "--mode", "vanilla", "--exp", str(tmp_path / "o"), *FAST])
    assert rc == 2 and message in err and "Traceback" not in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(ro / "run"), *FAST])
        assert rc == 2 and "permission denied" in err
    finally:
        ro.chmod(0o755)


def test_unwritable_output_folder_is_refused_before_sampling(capsys, tmp_path, monkeypatch):
    """The same check as a read-only folder (root ignores permissions, so os.access is faked)."""
    target = tmp_path / "ro"
    target.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == target else real(p, mode))
    monkeypatch.setattr(DDIMSampler, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    rc, err = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(target), *FAST])
    assert rc == 2 and "cannot write to" in err and "permission denied" in err


def test_ctrl_c_says_how_to_resume(capsys, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(DDIMSampler, "sample", interrupted)
    out = tmp_path / "run"
    rc, err = run(capsys, entry.main, ["--mode", "vanilla", "--exp", str(out), *FAST])
    assert rc == 130 and "--resume" in err and "Traceback" not in err
    assert not (out / ".lock").exists()                          # the lock is released


# ---- 9. refused, not accepted silently ------------------------------------------------------------
def test_adp_without_a_model_hash_is_refused(capsys, tmp_path):
    adp = _write_adp(tmp_path / "nohash.pt", drop_hash=True)
    rc, err = run(capsys, entry.main, ["--mode", "distribution", "--target", "parity=0.5", "--adp", str(adp),
                                       "--exp", str(tmp_path / "o"), *GUIDED])
    assert rc == 2 and "records no model checkpoint hash" in err


@pytest.mark.parametrize("argv, message", [(["--epochs", "0"], "--epochs must be >= 1"),
                                           (["--val_fraction", "1.5"], "--val_fraction in (0, 1)")])
def test_training_numbers_are_checked(capsys, tmp_path, argv, message):
    rc, err = run(capsys, multi_classifier.main, ["--data", str(tmp_path), "--out", str(tmp_path / "a.pt"), *argv])
    assert rc == 2 and message in err and not (tmp_path / "a.pt").exists()


def test_extraction_resumed_with_other_seeds_is_refused(capsys, tmp_path):
    h = tmp_path / "h"
    base = ["--extract_pseudo", "2", "--savepath", str(h), *FAST]
    assert entry.main(base) == 0
    rc, err = run(capsys, entry.main, [*base, "--seed", "7"])
    assert rc == 2 and "different ['seeds']" in err


def test_unlabelled_data_says_so(capsys, tmp_path):
    h = tmp_path / "h"
    from utils.data.extract import _save_shard, _write_meta
    _write_meta(h, {"model": {}, "h_shape": [1], "timesteps": [1], "attributes": {}, "source": "folders"})
    _save_shard(h, 0, {"h": torch.zeros(2, 1, 1), "ids": [0, 1], "labels": {}})
    h_cls = load_script("h_classification.py")
    rc, err = run(capsys, h_cls.main, ["--data", str(h), "--attribute", "gender", "--out", str(tmp_path / "a.pt")])
    assert rc == 2 and "no labels for ['gender']" in err and "unlabelled extraction" in err


def test_relative_exp_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert entry.main(["--mode", "vanilla", "--exp", "rel", *FAST]) == 0
    assert (tmp_path / "rel" / "000000.png").exists()


def test_bad_judge_fails_before_any_image(capsys, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(resolve_path("configs/digits16.yml").read_text().replace(
        "judge: pretrained/digits16_judge.pt", "judge: pretrained/no_such_judge.pt"))
    out = tmp_path / "o"
    rc, err = run(capsys, entry.main, ["--config", str(cfg), "--mode", "vanilla", "--evaluate", "--exp", str(out), *FAST])
    assert rc == 2 and "no_such_judge.pt" in err and not out.exists()
