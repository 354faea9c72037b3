"""Text-to-image fairness metrics (utils/evaluation/fairness.py) against hand-computed answers, the
shipped prompt sets, and the harness (bench/t2i_fairness.py) end to end on the digits default."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from utils.evaluation.correction import bootstrap_corrected
from utils.evaluation.fairness import kl_to_target, mean_over_prompts, parity_gap, prompt_fairness
from utils.evaluation.metrics import bootstrap_fd

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits16_t2i.yml"
HAVE_DIGITS_T2I = (ROOT / "pretrained" / "digits16_t2i" / "model_index.json").is_file()
needs_t2i = pytest.mark.skipif(not HAVE_DIGITS_T2I, reason="pretrained/digits16_t2i is not there")

LABELS_70_30 = np.array([0] * 7 + [1] * 3)
COUNTS = np.array([[90, 10], [20, 80]])     # M = [[0.9, 0.1], [0.2, 0.8]]


# ----------------------------------------------------------------------------- the metrics
def test_metrics_of_70_30_against_50_50():
    p, u = [0.7, 0.3], [0.5, 0.5]
    assert kl_to_target(p, u) == pytest.approx(0.7 * math.log(1.4) + 0.3 * math.log(0.6), abs=1e-12)
    assert kl_to_target(p, u) == pytest.approx(0.0823, abs=1e-4)
    assert parity_gap(p) == pytest.approx(0.4)
    row = prompt_fairness(LABELS_70_30, u)
    assert row["raw"]["fractions"] == pytest.approx(p)
    assert row["raw"]["fd"] == pytest.approx(math.sqrt(0.04 + 0.04)) and row["raw"]["fd"] == pytest.approx(0.28284, abs=1e-5)
    assert row["raw"]["kl"] == pytest.approx(0.08228, abs=1e-5)
    assert row["raw"]["parity_gap"] == pytest.approx(0.4)
    assert row["corrected"] is None and row["n"] == 10


def test_corrected_by_a_2x2_confusion_by_hand():
    """M^T p = p_hat: 0.9 a + 0.2 (1 - a) = 0.7 -> a = 5/7; p_corrected = 5/7 / 2/7."""
    row = prompt_fairness(LABELS_70_30, [0.5, 0.5], confusion=COUNTS)["corrected"]
    a = 5 / 7
    assert row["fractions"] == pytest.approx([a, 1 - a], abs=1e-12)
    assert row["fd"] == pytest.approx(math.sqrt(2) * (a - 0.5), abs=1e-12)            # 0.30305
    assert row["parity_gap"] == pytest.approx(3 / 7, abs=1e-12)
    assert row["kl"] == pytest.approx(a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)), abs=1e-12)   # 0.09488


def test_kl_zero_cells_and_k_classes():
    assert kl_to_target([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))      # 0 ln 0 = 0
    eps = 1e-6                          # u_0 = 0 raised to eps, u renormalised: finite
    u = np.array([eps, 1.0]) / (1 + eps)
    want = 0.5 * math.log(0.5 / u[0]) + 0.5 * math.log(0.5 / u[1])
    assert kl_to_target([0.5, 0.5], [0.0, 1.0], eps) == pytest.approx(want, rel=1e-9)
    assert kl_to_target([0.25] * 4, [0.25] * 4) == 0.0
    assert parity_gap([0.5, 0.3, 0.2]) == pytest.approx(0.3)
    assert parity_gap([0.25] * 4) == 0.0
    np.testing.assert_allclose(parity_gap(np.array([[0.7, 0.3], [0.5, 0.5]])), [0.4, 0.0])


def test_probabilities_are_judged_by_their_argmax():
    probs = np.eye(2)[LABELS_70_30] * 0.8 + 0.1
    assert prompt_fairness(probs, [0.5, 0.5]) == prompt_fairness(LABELS_70_30, [0.5, 0.5])


def test_bootstrap_intervals_contain_the_point_and_follow_the_seed():
    labels = np.random.default_rng(1).choice(2, size=200, p=[0.7, 0.3])
    a = prompt_fairness(labels, [0.5, 0.5], COUNTS, n_boot=500, seed=3)
    assert a == prompt_fairness(labels, [0.5, 0.5], COUNTS, n_boot=500, seed=3)
    assert a != prompt_fairness(labels, [0.5, 0.5], COUNTS, n_boot=500, seed=4)
    for kind in ("raw", "corrected"):
        for m in ("fd", "kl", "parity_gap"):
            lo, hi = a[kind][f"{m}_ci"]
            assert lo <= a[kind][m] <= hi, (kind, m)
        for v, (lo, hi) in zip(a[kind]["fractions"], a[kind]["fractions_ci"]):
            assert lo <= v <= hi


def test_the_replicates_are_those_of_bootstrap_fd_and_bootstrap_corrected():
    """FD comes from metrics / correction; KL and the gap use the same draws (same seed)."""
    labels = np.random.default_rng(2).choice(2, size=60, p=[0.6, 0.4])
    row = prompt_fairness(labels, [0.5, 0.5], COUNTS, n_boot=300, seed=5)
    fd, lo, hi = bootstrap_fd(labels, [0.5, 0.5], 2, 300, 5)
    assert row["raw"]["fd"] == fd and row["raw"]["fd_ci"] == [lo, hi]
    ref = bootstrap_corrected(labels, COUNTS, [0.5, 0.5], 300, 5)
    np.testing.assert_allclose(row["corrected"]["fractions_ci"], ref["fractions_corrected_ci"], atol=1e-12)
    assert row["corrected"]["fd"] == ref["fd_corrected"] and row["corrected"]["fd_ci"] == ref["fd_corrected_ci"]
    # the gap of a binary distribution is sqrt(2) * its FD to 50/50: the same replicates give the same interval
    assert np.asarray(row["raw"]["parity_gap_ci"]) == pytest.approx(np.sqrt(2) * np.asarray(row["raw"]["fd_ci"]))


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="sum to 1"):
        prompt_fairness(LABELS_70_30, [0.3, 0.3])
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        prompt_fairness(LABELS_70_30, [0.5, 0.5], confusion=np.ones((3, 3)))
    with pytest.raises(ValueError, match="classes"):
        prompt_fairness(np.full((4, 3), 1 / 3), [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        mean_over_prompts([])


def test_mean_over_prompts():
    a = prompt_fairness(LABELS_70_30, [0.5, 0.5], COUNTS, n_boot=50)
    b = prompt_fairness(np.array([0, 1] * 5), [0.5, 0.5], COUNTS, n_boot=50)
    m = mean_over_prompts([a, b])
    assert m["prompts"] == 2
    assert m["raw"]["fd"] == pytest.approx(math.sqrt(0.08) / 2) and m["raw"]["parity_gap"] == pytest.approx(0.2)
    # corrected: 70/30 -> 5/7 / 2/7 (gap 3/7); 50/50 -> 3/7 / 4/7 (0.9 a + 0.2 (1 - a) = 0.5; gap 1/7)
    assert m["corrected"]["parity_gap"] == pytest.approx((3 / 7 + 1 / 7) / 2)
    assert mean_over_prompts([a, prompt_fairness(LABELS_70_30, [0.5, 0.5], n_boot=50)])["corrected"] is None


# ----------------------------------------------------------------------------- prompts and flags
def test_the_shipped_prompt_sets():
    from bench.t2i_fairness import load_prompt_set, shipped_sets
    assert {"digits", "winobias_occupations", "fair_diffusion_occupations"} <= set(shipped_sets())
    digits, source, _ = load_prompt_set("digits")
    assert digits == ["a digit", "a small digit", "a large digit"] and "digits16_t2i" in source
    wino, source, _ = load_prompt_set("winobias_occupations")
    assert len(set(wino)) == 40 and all(q.startswith("a photo of the face of a ") for q in wino)
    assert "Zhao et al. 2018" in source
    fair, source, _ = load_prompt_set("fair_diffusion_occupations.txt")
    assert len(set(fair)) == len(fair) == 153 and "Fair-Diffusion" in source


def test_prompt_files_skip_comments(tmp_path):
    from bench.t2i_fairness import load_prompt_set
    f = tmp_path / "p.txt"
    f.write_text("# source: a test\n#   continued\n\n a digit \n# a comment\na number\n")
    assert load_prompt_set(str(f))[:2] == (["a digit", "a number"], "a test continued")
    f.write_text("# source: nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompt_set(str(f))
    with pytest.raises(ValueError, match="shipped prompt set"):
        load_prompt_set("no_such_set")


def test_methods_and_targets():
    from bench.t2i_fairness import eval_target, parse_methods
    assert parse_methods(["vanilla,ours", "paper", "ours"]) == ["vanilla", "ours", "paper"]
    assert parse_methods(None) == ["vanilla", "ours"]
    with pytest.raises(ValueError, match="choose from"):
        parse_methods(["vanilla,best"])
    assert eval_target("parity", "0.5", ["even", "odd"]) == [0.5, 0.5]
    assert eval_target("parity", "0.8", ["even", "odd"]) == pytest.approx([0.2, 0.8])
    assert eval_target("digit", "uniform", list("0123456789")) == [0.1] * 10
    assert eval_target("parity", "1:0", ["even", "odd"]) == [1.0, 0.0]        # not smoothed
    with pytest.raises(ValueError, match="sum to 1"):
        eval_target("parity", "0.3:0.3", ["even", "odd"])


def test_augment_refuses_words_the_model_never_saw():
    """The digits model knows only its training prompts' words; "even" / "odd" are not among them."""
    from bench.t2i_fairness import augment_refusal, unknown_words
    from utils.app.config import load_config
    cfg = load_config(str(CONFIG))
    why = augment_refusal(cfg, None, ["a digit"], ["even", "odd"])
    assert why and "'even'" in why and "'odd'" in why and "digit" in why
    assert unknown_words(cfg, None, ["a small digit", "a number"])[0] == []
    assert unknown_words(cfg, None, ["a photo of the face of a nurse"])[0] == ["face", "nurse", "of", "photo", "the"]


@needs_t2i
def test_without_training_prompts_the_tokenizer_decides():
    from transformers import CLIPTokenizer
    from bench.t2i_fairness import unknown_words
    tok = CLIPTokenizer.from_pretrained(ROOT / "pretrained" / "digits16_t2i" / "tokenizer")
    pipe = SimpleNamespace(pipe=SimpleNamespace(tokenizer=tok))
    cfg = {"model": {"family": "sd", "checkpoint": "x"}}
    assert unknown_words(cfg, pipe, ["a large digit"])[0] == []
    assert "even" in unknown_words(cfg, pipe, ["a digit even"])[0]


def test_clip_score_with_a_tiny_clip(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from helpers import save_tiny_clip
    from bench.t2i_fairness import ClipScorer, clip_spec
    folder = save_tiny_clip(tmp_path / "clip")
    spec = {"kind": "clip", "model": str(folder), "classes": {"female": "a woman", "male": "a man"}}
    cfg = {"model": {"family": "sd", "checkpoint": "x"}, "judge": "j.pt", "labeller": spec}
    assert clip_spec(cfg) == spec and clip_spec({**cfg, "labeller": "digits_svc"}) is None
    score = ClipScorer(spec).score(torch.rand(3, 3, 16, 16) * 2 - 1, "a photo of a doctor")
    assert math.isfinite(score) and 0 <= score <= 100


# ----------------------------------------------------------------------------- the harness
@pytest.mark.parametrize("argv, message", [
    (["--method", "vanilla,best"], "choose from"),
    (["--prompts", "no_such_set"], "shipped prompt set"),
    (["--config", str(CONFIG), "--target", "0.5"], "needs --attribute"),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    from bench.t2i_fairness import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_an_empty_prompt_file_exits_2(capsys, tmp_path):
    from bench.t2i_fairness import main
    (tmp_path / "empty.txt").write_text("# source: none\n")
    assert main(["--prompts", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


@needs_t2i
def test_a_target_not_summing_to_one_exits_2(capsys):
    from bench.t2i_fairness import main
    assert main(["--config", str(CONFIG), "--attribute", "parity", "--target", "0.3:0.3"]) == 2
    assert "sum to 1" in capsys.readouterr().err


@needs_t2i
def test_augment_interleaves_the_class_words():
    """Image k is drawn from seed k with class k mod K's word: the same as a run of that prompt."""
    import torch
    from bench.t2i_fairness import generate, sample_images
    from utils.app.config import load_config
    from utils.sampling.text2image import load_t2i
    cfg = load_config(str(CONFIG))
    pipe = load_t2i(cfg, torch.device("cpu"), steps=4).with_prompt("a digit")
    x, used = generate("augment", pipe, [0, 1, 2], 2, cfg, None, {}, ["small", "large"], None)
    assert used == ["a digit, small", "a digit, large"] and x.shape == (3, 3, 16, 16)
    torch.testing.assert_close(x[[0, 2]], sample_images(pipe.with_prompt(used[0]), [0, 2], 2))
    torch.testing.assert_close(x[[1]], sample_images(pipe.with_prompt(used[1]), [1], 1))


@needs_t2i
def test_the_harness_end_to_end_on_the_digits_default(tmp_path, capsys):
    from bench.t2i_fairness import main
    prompts = tmp_path / "one.txt"
    prompts.write_text("# source: a test\na small digit\n")
    out = tmp_path / "out"
    argv = ["--config", str(CONFIG), "--prompts", str(prompts), "--method", "vanilla,ours", "--method", "augment",
            "--n", "8", "--bs", "8", "--cfg", "3", "--n_boot", "200", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    md = (out / "fairness.md").read_text()
    for method in ("vanilla", "ours"):
        line = next(x for x in md.splitlines() if x.startswith(f"| a small digit | {method} | 3 |"))
        assert line.rstrip().endswith("| - |")                     # no CLIP model: no CLIP score
    assert "not run: augment" in md and "'even'" in md
    from PIL import Image
    assert Image.open(out / "fairness.png").size == (640, 400)    # the FD-per-CFG plot, drawn with Pillow
    report = json.loads((out / "fairness.json").read_text())
    assert [(r["method"], r["cfg"]) for r in report["rows"]] == [("vanilla", 3.0), ("ours", 3.0)]
    for r in report["rows"]:
        assert r["n"] == 8 and r["corrected"] is not None          # the digits judge stores its confusion
        for kind in ("raw", "corrected"):
            for m in ("fd", "kl", "parity_gap"):
                assert all(math.isfinite(v) for v in [r[kind][m], *r[kind][f"{m}_ci"]])
    assert [m["method"] for m in report["means"]] == ["vanilla", "ours"]
    assert report["settings"]["target"] == [0.5, 0.5] and report["refused"].keys() == {"augment"}
    # the guidance is connected: "a small digit" is 80% even, guided to 50/50 it is fairer
    vanilla, ours = report["rows"]
    assert ours["raw"]["fd"] < vanilla["raw"]["fd"]


def test_images_without_a_face_are_left_out_and_counted():
    import torch
    from bench.t2i_fairness import judged

    class Detector:                    # a judge behind a face detector: NaN rows where no face was found
        def __init__(self, rows):
            self.rows = rows

        def predict(self, x):
            return {"gender": torch.tensor(self.rows[: len(x)])}
    nan = float("nan")
    probs, no_face = judged(Detector([[0.9, 0.1], [nan, nan], [0.2, 0.8], [nan, nan]]),
                            torch.zeros(4, 3, 8, 8), "gender", "a test")
    assert no_face == 2 and torch.allclose(probs, torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    assert prompt_fairness(probs, [0.5, 0.5], n_boot=10)["n"] == 2
    with pytest.raises(ValueError, match="no face in any of the 1 images"):
        judged(Detector([[nan, nan]]), torch.zeros(1, 3, 8, 8), "gender", "a test")


def test_the_judge_flag_takes_a_yaml_mapping():
    from bench.t2i_fairness import judge_spec
    assert judge_spec("pretrained/digits16_judge.pt") == "pretrained/digits16_judge.pt"
    assert judge_spec("{kind: age_and_gender, detect: true}") == {"kind": "age_and_gender", "detect": True}
    with pytest.raises(ValueError, match="not a YAML mapping"):
        judge_spec("{kind: [")
