"""Bad input to ADP training (multi_classifier.py) and to h-vector extraction (main.py
--just_precompute / --extract_pseudo): a one-line message naming the flag or file, exit 2, and
nothing written; a rerun into an extraction resumes only the same inputs and redoes broken shards.

Each test names the input case it checks (as a new user would type it). Training
data is a hand-made extraction (h 4x2x2 at 5 steps); extraction runs the embedded digits model
with 5 DDIM steps on 4-5 images."""
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import h_classification
import main as entry
import multi_classifier
from models.adp import ADP
from utils.app import commands
from utils.data import extract
from utils.data.extract import _save_shard, _write_meta
from utils.data.extract_t2i import extract_t2i_pseudo

ROOT = Path(__file__).resolve().parent.parent
DIGITS = {"parity": ["even", "odd"], "magnitude": ["low", "high"], "digit": [str(d) for d in range(10)]}
H_SHAPE, TIMESTEPS, N = (4, 2, 2), [800, 600, 400, 200, 0], 20
FAST = ["--device", "cpu", "--steps", "5", "--bs_test", "2"]


def run(capsys, fn, argv):
    capsys.readouterr()
    rc = fn([str(a) for a in argv])
    return rc, capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(rc, err, *words):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def digits_h(tmp_path_factory):
    """An extraction labelled for parity, magnitude and digit (2 shards of 10)."""
    folder = tmp_path_factory.mktemp("h") / "digits"
    g = torch.Generator().manual_seed(0)
    digit = torch.arange(N) % 10
    labels = {"parity": digit % 2, "magnitude": (digit >= 5).long(), "digit": digit}
    h = torch.randn(N, len(TIMESTEPS), *H_SHAPE, generator=g).half()
    _write_meta(folder, {"model": {"config": "toy"}, "h_shape": list(H_SHAPE), "timesteps": TIMESTEPS,
                         "source": "pseudo", "attributes": DIGITS, "shard_size": 10, "n": N})
    for k in range(2):
        _save_shard(folder, k, {"h": h[10 * k:10 * (k + 1)], "ids": list(range(10 * k, 10 * (k + 1))),
                                "labels": {a: v[10 * k:10 * (k + 1)] for a, v in labels.items()}})
    return folder


@pytest.fixture
def no_training(monkeypatch):
    """Training or reading the data fails the test: the checks come first."""
    def refuse(*_a, **_k):
        raise AssertionError("reached training")
    monkeypatch.setattr(multi_classifier, "train_adp_stream", refuse)
    monkeypatch.setattr(multi_classifier, "open_h_dataset", refuse)


# ---- 1, 3. numeric options are checked up front --------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--batch_size", "0"], ["--batch_size 0", "must be >= 1"]),
    (["--batch_size", "-4"], ["--batch_size -4", "must be >= 1"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
    (["--lr", "0"], ["--lr 0.0", "finite number > 0"]),
    (["--lr", "nan"], ["--lr nan", "finite number > 0"]),
    (["--lr", "inf"], ["--lr inf", "finite number > 0"]),
    (["--val_fraction", "1"], ["--val_fraction in (0, 1)"]),
    (["--val_fraction", "nan"], ["--val_fraction in (0, 1)"]),
    (["--limit", "0"], ["--limit 0", "N >= 1"]),                     # 0 is not "all"
    (["--limit", "-1"], ["--limit -1", "N >= 1"]),
])
def test_training_numbers_are_refused_before_reading_the_data(capsys, tmp_path, digits_h, no_training, argv, words):
    out = tmp_path / "adp.pt"
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", out, *argv])
    one_line_error(rc, err, *words)
    assert not list(tmp_path.iterdir())


def test_training_options_are_read(capsys, tmp_path, digits_h):
    """--limit 12 trains on 12 samples; --batch_size 3 runs (no split_size error)."""
    out = tmp_path / "adp.pt"
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", out, "--limit", "12",
                                                  "--batch_size", "3", "--epochs", "1", "--attributes", "parity"])
    assert rc == 0, err
    assert ADP.load(out).meta["data_source"]["n"] == 12


# ---- 2. --out is checked before training ---------------------------------------------------------
def test_out_naming_a_folder_writes_an_adp_folder_and_never_replaces_one(capsys, tmp_path, digits_h):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    args = ["--data", digits_h, "--out", folder, "--limit", "12", "--batch_size", "3", "--epochs", "1",
            "--attributes", "parity"]
    rc, err = run(capsys, multi_classifier.main, args)
    assert rc == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "accuracy.md", "accuracy.png", "config.json",
                                                        "mine.txt", "model.safetensors"]
    assert ADP.load(folder).meta["data_source"]["n"] == 12 and "parity" in (folder / "README.md").read_text()
    before = (folder / "model.safetensors").read_bytes()
    rc, err = run(capsys, multi_classifier.main, args)
    one_line_error(rc, err, "exist", "--overwrite")
    assert (folder / "model.safetensors").read_bytes() == before and (folder / "mine.txt").read_text() == "keep"


def test_out_whose_folder_is_a_file_is_refused(capsys, tmp_path, digits_h, no_training):
    blocker = tmp_path / "notes"
    blocker.write_text("not a folder")
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", blocker / "sub" / "adp.pt"])
    one_line_error(rc, err, str(blocker), "is a file", "choose another --out")
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_out_in_a_folder_that_cannot_be_written_is_refused(capsys, tmp_path, digits_h, no_training, monkeypatch):
    """Root ignores permissions, so os.access is faked (as tests/test_faults.py does)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", ro / "new" / "adp.pt"])
    one_line_error(rc, err, f"cannot write to {ro}", "permission denied")
    assert not list(ro.iterdir())


def test_reports_beside_the_checkpoint_are_not_clobbered(capsys, tmp_path, digits_h, no_training):
    out = tmp_path / "adp.pt"
    (tmp_path / "adp.json").write_text('{"mine": true}')
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", out])
    one_line_error(rc, err, "adp.json exists", "--overwrite")
    assert (tmp_path / "adp.json").read_text() == '{"mine": true}' and not out.exists()
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", tmp_path / "adp.json"])
    one_line_error(rc, err, "NAME.pt")                              # its report would replace it


def test_overwrite_replaces_checkpoint_and_reports(capsys, tmp_path, digits_h):
    out = tmp_path / "adp.pt"
    (tmp_path / "adp.json").write_text("old")
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--out", out, "--overwrite", "--epochs", "1"])
    assert rc == 0, err
    assert json.loads((tmp_path / "adp.json").read_text())["data_source"]["n"] == N


# ---- 4. a missing attribute names the ones the data has ------------------------------------------
@pytest.mark.parametrize("script, flag", [(multi_classifier, "--attributes"), (h_classification, "--attribute")])
def test_missing_attribute_names_the_labels_the_data_has(capsys, tmp_path, digits_h, script, flag):
    rc, err = run(capsys, script.main, ["--data", digits_h, flag, "gender", "--out", tmp_path / "a.pt"])
    one_line_error(rc, err, "no labels for ['gender']", "'parity'", "'magnitude'", "'digit'")
    assert "unlabelled" not in err and not list(tmp_path.iterdir())


# ---- 5. --priors_from_samples 0 is given, not absent ---------------------------------------------
def test_priors_from_zero_samples_is_refused_as_given(capsys, tmp_path, digits_h):
    adp = tmp_path / "adp.pt"
    rc, err = run(capsys, multi_classifier.main, ["--priors_from_samples", "0", "--adp", adp, "--out", adp])
    one_line_error(rc, err, "--priors_from_samples 0", ">= 1")
    assert "needs --data" not in err
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--priors_from_samples", "0",
                                                  "--out", tmp_path / "b.pt"])
    one_line_error(rc, err, "--priors_from_samples 0")              # refused, not trained on --data
    rc, err = run(capsys, multi_classifier.main, ["--data", digits_h, "--priors_from_samples", "5",
                                                  "--adp", adp, "--out", tmp_path / "b.pt"])
    one_line_error(rc, err, "not --data and --priors_from_samples")
    assert not list(tmp_path.iterdir())


# ---- 6, 7. a rerun resumes only the same inputs, and redoes broken shards ------------------------
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((16, 16), value, np.uint8)
    arr[4:10, 5:9] = 255 - value
    Image.fromarray(arr, mode="L").save(path)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for name, values in {"even": [20, 60], "odd": [180, 220]}.items():
        for j, v in enumerate(values):
            _png(root / name / f"img{j}.png", v)
    return root


def folders_argv(images, out):
    return ["--just_precompute", "True", "--test_path_one", images, "--attribute", "parity",
            "--savepath", out, *FAST]


def _load(path):
    return torch.load(path, weights_only=True)


def test_rerun_with_another_image_list_is_refused(capsys, tmp_path, images):
    out = tmp_path / "h"
    assert entry.main([str(a) for a in folders_argv(images, out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 4 and len(meta["images_sha256"]) == 64
    before = snapshot(out)
    _png(images / "odd" / "img2.png", 140)
    rc, err = run(capsys, entry.main, folders_argv(images, out))
    one_line_error(rc, err, str(out), "n: 4 -> 5", "image list", "another --savepath or delete the folder")
    assert snapshot(out) == before
    (images / "odd" / "img2.png").unlink()
    (images / "odd" / "img1.png").rename(images / "odd" / "img9.png")          # same count, other image
    rc, err = run(capsys, entry.main, folders_argv(images, out))
    one_line_error(rc, err, "image list")
    (images / "odd" / "img9.png").rename(images / "odd" / "img1.png")
    twin = tmp_path / "twin"                                                    # same names, other folder
    shutil.copytree(images, twin)
    rc, err = run(capsys, entry.main, folders_argv(twin, out))
    one_line_error(rc, err, "['folder']", str(twin))
    assert snapshot(out) == before


def test_resume_of_the_same_images_redoes_only_the_missing_shard(capsys, tmp_path, images):
    out = tmp_path / "h"
    assert entry.main([str(a) for a in folders_argv(images, out)]) == 0
    first, second = out / "shard_00000.pt", out / "shard_00001.pt"
    want, mtime = _load(second), first.stat().st_mtime_ns
    second.unlink()
    rc, err = run(capsys, entry.main, folders_argv(images, out))
    assert rc == 0, err
    assert first.stat().st_mtime_ns == mtime and torch.equal(_load(second)["h"], want["h"])


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _too_few_rows(path):
    shard = _load(path)
    torch.save({**shard, "h": shard["h"][:1], "ids": shard["ids"][:1],
                "labels": {a: v[:1] for a, v in shard["labels"].items()}}, path)


def _other_h_shape(path):
    shard = _load(path)
    torch.save({**shard, "h": shard["h"][:, :-1]}, path)                # a step short


BREAKS = {"truncated": (_truncate, "cannot be read"), "too few rows": (_too_few_rows, "holds h of shape"),
          "other h shape": (_other_h_shape, "holds h of shape")}


@pytest.mark.parametrize("kind", ["folders", "pseudo"])
@pytest.mark.parametrize("damage", list(BREAKS))
def test_resume_redoes_a_broken_shard(capsys, caplog, tmp_path, images, kind, damage):
    out = tmp_path / "h"
    argv = folders_argv(images, out) if kind == "folders" else ["--extract_pseudo", "4", "--savepath", out, *FAST]
    assert entry.main([str(a) for a in argv]) == 0
    broken, kept = out / "shard_00001.pt", out / "shard_00000.pt"
    want, mtime, meta = _load(broken), kept.stat().st_mtime_ns, (out / "meta.json").read_text()
    damage_fn, why = BREAKS[damage]
    damage_fn(broken)
    rc, err = run(capsys, entry.main, argv)
    assert rc == 0, err
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "shard_00001.pt" in r.getMessage()]
    assert warnings and why in warnings[0] and "extracted again" in warnings[0]
    redone = _load(broken)
    assert torch.equal(redone["h"], want["h"]) and redone["ids"] == want["ids"]
    assert kept.stat().st_mtime_ns == mtime and (out / "meta.json").read_text() == meta


class StubT2I:
    """A text-to-image pipeline's interface for extraction: h at each of 3 steps is the seed + step."""
    timesteps, h_shape, eta, cfg_scale, steps = [801, 401, 1], (2, 1, 1), 0.0, 3.0, 3
    pipe = SimpleNamespace(scheduler=SimpleNamespace())

    def __init__(self):
        self.drawn = []

    def with_prompt(self, prompt, negative_prompt):
        return self

    def draw(self, seeds, record):
        self.drawn.append(list(seeds))
        record.extend(torch.tensor(seeds, dtype=torch.float32)[:, None, None, None].repeat(1, 2, 1, 1) + s
                      for s in range(3))
        return torch.zeros(len(seeds), 1, 4, 4)


class StubLabeller:
    attributes = {"a": ["x", "y"]}

    def predict(self, images):
        return {"a": torch.tensor([[0.3, 0.7]]).repeat(len(images), 1)}


@pytest.mark.parametrize("damage", list(BREAKS))
def test_text_to_image_resume_redoes_a_broken_shard(caplog, tmp_path, damage):
    out, seeds, prompts = tmp_path / "h", [5, 6, 7, 8], ["a photo", "a drawing"]
    extract_t2i_pseudo(StubT2I(), prompts, seeds, StubLabeller(), out, {"model": {"config": "stub"}}, batch_size=2)
    want = _load(out / "shard_00001.pt")
    BREAKS[damage][0](out / "shard_00001.pt")
    pipe = StubT2I()
    extract_t2i_pseudo(pipe, prompts, seeds, StubLabeller(), out, {"model": {"config": "stub"}}, batch_size=2)
    assert pipe.drawn == [[7, 8]]                                   # only the broken shard
    redone = _load(out / "shard_00001.pt")
    assert torch.equal(redone["h"], want["h"]) and redone["prompt"] == "a drawing"
    assert any("shard_00001.pt" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


# ---- 8. a broken meta.json or shard is named, with the fix ---------------------------------------
BAD_META = {"invalid JSON": ('{"timesteps": [1,', "is not valid JSON"),
            "not a mapping": ("[1, 2, 3]", "holds an array"),
            "missing keys": ('{"timesteps": [1]}', "lacks the keys ['h_shape', 'attributes']"),
            "attributes a list": ('{"timesteps": [1], "h_shape": [4, 2, 2], "attributes": ["parity"]}',
                                  "'attributes' does not map")}


@pytest.mark.parametrize("case", list(BAD_META))
def test_broken_meta_json_is_named_for_training(capsys, tmp_path, case):
    text, words = BAD_META[case]
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "meta.json").write_text(text)
    rc, err = run(capsys, multi_classifier.main, ["--data", folder, "--out", tmp_path / "a.pt"])
    one_line_error(rc, err, str(folder / "meta.json"), words, "re-run the extraction", "new --savepath")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]


@pytest.mark.parametrize("case", list(BAD_META))
def test_broken_meta_json_is_named_when_resuming(capsys, tmp_path, case):
    text, words = BAD_META[case]
    out = tmp_path / "h"
    out.mkdir()
    (out / "meta.json").write_text(text)
    rc, err = run(capsys, entry.main, ["--extract_pseudo", "2", "--savepath", out, *FAST])
    one_line_error(rc, err, str(out / "meta.json"), words, "new --savepath")
    assert snapshot(out) == {"meta.json": text.encode()}


@pytest.mark.parametrize("content", ["truncated", "a tensor"])
def test_unreadable_shard_is_named_for_training(capsys, tmp_path, digits_h, content):
    folder = tmp_path / "h"
    folder.mkdir()
    for f in digits_h.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    shard = folder / "shard_00001.pt"
    if content == "truncated":
        _truncate(shard)
    else:
        torch.save(torch.zeros(3), shard)
    rc, err = run(capsys, multi_classifier.main, ["--data", folder, "--out", tmp_path / "a.pt"])
    one_line_error(rc, err, str(shard))
    assert not (tmp_path / "a.pt").exists()


# ---- 9. train_adp.sh leaves the shipped checkpoint alone -----------------------------------------
def test_train_adp_sh_writes_under_runs_by_default():
    def argv(env=(), args=()):
        done = subprocess.run(["bash", str(ROOT / "train_adp.sh"), *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": "echo", **dict(env)}, check=True)
        words = done.stdout.split()
        return words[len(words) - 1 - words[::-1].index("--out") + 1]   # the last --out wins
    assert argv() == "runs/digits16_adp.pt"
    assert argv(env={"OUT": "elsewhere/adp.pt"}) == "elsewhere/adp.pt"
    assert argv(args=["--out", "mine.pt"]) == "mine.pt"


# ---- 10. extraction input is checked before anything is written ----------------------------------
def test_extract_refuses_a_non_positive_sample_count():
    for n in (0, -5):
        args = SimpleNamespace(savepath="never", just_precompute=False, extract_pseudo=n)
        with pytest.raises(ValueError, match=r"--extract_pseudo N: N must be >= 1"):
            commands.extract({"model": {}}, args)
    assert not (Path.cwd() / "never").exists()


@pytest.mark.parametrize("case", ["empty class folder", "no image files", "undecodable image", "savepath a file",
                                  "savepath with other files", "both modes"])
def test_bad_extraction_input_writes_nothing(capsys, tmp_path, images, case):
    out = tmp_path / "h"
    argv = folders_argv(images, out)
    if case == "empty class folder":
        (images / "zero").mkdir()
        words = [str(images / "zero"), "holds no images"]
    elif case == "no image files":
        (images / "zero").mkdir()
        (images / "zero" / "list.txt").write_text("img0.png\n")
        words = [str(images / "zero"), "holds no images"]
    elif case == "undecodable image":
        (images / "odd" / "img1.png").write_bytes(b"not a png")      # read in the second batch, after shard 0 is written
        words = [str(images / "odd" / "img1.png"), "cannot read image", "replace or remove"]
    elif case == "savepath a file":
        out.write_text("x")
        words = [f"--savepath {out} is a file"]
    elif case == "savepath with other files":
        out.mkdir()
        (out / "thesis.tex").write_text("x")
        words = [f"--savepath {out}", "no extraction"]
    else:
        argv += ["--extract_pseudo", "3"]
        words = ["not both"]
    before = snapshot(tmp_path)
    rc, err = run(capsys, entry.main, argv)
    one_line_error(rc, err, *words)
    assert snapshot(tmp_path) == before


def test_images_list_ignores_hidden_files_and_names_the_skipped_ones(caplog, images):
    (images / "odd" / ".DS_Store").write_bytes(b"\0")
    (images / "odd" / "notes.txt").write_text("x")
    classes = extract.list_class_folders(images)
    assert [p.name for p in classes["odd"]] == ["img0.png", "img1.png"]
    assert any("notes.txt" in r.getMessage() and ".DS_Store" not in r.getMessage() for r in caplog.records)
