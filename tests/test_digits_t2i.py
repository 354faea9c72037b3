"""The text-to-image digits model (models/digits_t2i.py, utils/data/train_t2i.py,
scripts/train_digits_t2i.py): exact per-prompt fractions, one token per word, and a tiny
training run whose folder loads through the sd family like Stable Diffusion."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from models.digits_t2i import PromptSpec, attribute_fractions, parse_prompts, prompt_data, prompt_subset, \
    subset_size, tinted, tokenizer_files, vocabulary
from utils.app.config import load_config

CONFIG = "configs/digits16_t2i.yml"


def test_a_spec_splits_its_even_share_equally_within_each_parity():
    small = PromptSpec.from_config("a small digit", {"digits": [0, 1, 2, 3, 4], "even": 0.8})
    assert small.digit_fractions() == {0: Fraction(4, 15), 1: Fraction(1, 10), 2: Fraction(4, 15),
                                       3: Fraction(1, 10), 4: Fraction(4, 15)}
    uniform = PromptSpec.from_config("a digit", {"digits": list(range(10))})
    fr = attribute_fractions(uniform.digit_fractions())
    assert fr["parity"] == {"even": 0.5, "odd": 0.5} and fr["magnitude"] == {"low": 0.5, "high": 0.5}
    with pytest.raises(ValueError, match="both parities"):
        PromptSpec.from_config("an even digit", {"digits": [0, 2], "even": 0.8})
    with pytest.raises(ValueError, match="both parities"):
        PromptSpec.from_config("an even digit", {"digits": [0, 2], "even": 0})
    assert PromptSpec.from_config("an even digit", {"digits": [0, 2], "even": 1}).digit_fractions() == \
        {0: Fraction(1, 2), 2: Fraction(1, 2)}
    with pytest.raises(ValueError, match="expected"):
        PromptSpec.from_config("a digit", {"digits": [0, 1], "odd": 0.5})


def test_the_subset_holds_each_digit_exactly_its_share_on_known_counts():
    """Known counts: digit 3 has one image, digit 2 five; 0, 2, 4 get 4/15 each of 120, 1 and 3
    1/10 each; every image of a digit is used floor or ceil of count / available times."""
    labels = np.array([0] * 3 + [1] * 2 + [2] * 5 + [3] * 1 + [4] * 4 + [7] * 6)
    fr = PromptSpec("a small digit", (0, 1, 2, 3, 4), Fraction(4, 5)).digit_fractions()
    size = subset_size([fr], 100)
    assert size == 120
    idx = prompt_subset(fr, labels, size, np.random.default_rng(0))
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.tolist() == [32, 12, 32, 12, 32, 0, 0, 0, 0, 0]
    uses = np.bincount(idx, minlength=len(labels))
    assert sorted(set(uses[labels == 0])) == [10, 11] and uses[labels == 3].tolist() == [12]
    assert uses[labels == 7].sum() == 0
    with pytest.raises(ValueError, match="whole count"):
        prompt_subset(fr, labels, 100, np.random.default_rng(0))


def test_a_mixture_spec_is_the_exact_weighted_sum_of_earlier_prompts():
    prompts = parse_prompts({"a small digit": {"digits": [0, 1, 2, 3, 4], "even": 0.8},
                             "a large digit": {"digits": [5, 6, 7, 8, 9], "even": 0.2},
                             "a digit": {"mix": {"a small digit": 0.75, "a large digit": 0.25}}})
    fr = prompts[2].digit_fractions()
    assert fr[0] == Fraction(1, 5) and fr[1] == Fraction(3, 40) and fr[6] == Fraction(1, 40) \
        and fr[9] == Fraction(1, 15) and sum(fr.values()) == 1
    assert attribute_fractions(fr)["parity"]["even"] == pytest.approx(0.65)
    assert prompts[2].shown() == {"digits": list(range(10)), "mix": {"a small digit": "3/4", "a large digit": "1/4"}}
    parts = parse_prompts({"a digit": {"mix": [{"digits": [0, 1, 2, 3, 4], "even": 0.82, "weight": 0.75},
                                                {"digits": [5, 6, 7, 8, 9], "even": 0.025, "weight": 0.25}]}})[0]
    fr = parts.digit_fractions()                    # unnamed parts: 3/4 * 41/50 / 3 and 1/4 * 1/40 / 2
    assert fr[0] == Fraction(41, 200) and fr[6] == Fraction(1, 320) and sum(fr.values()) == 1
    assert parts.shown()["mix"][1] == {"digits": [5, 6, 7, 8, 9], "even": "1/40", "weight": "1/4"}
    for bad, msg in [({"a digit": {"mix": {"a large digit": 1}}}, "not listed before it"),
                     ({"a digit": {"mix": [{"digits": [0, 1], "weight": 0.5}]}}, "sum to 1"),
                     ({"a digit": {"mix": [{"digits": [0, 1], "even": 0.5}]}}, "mix expects"),
                     ({"a digit": {"mix": [{"digits": [0, 1], "odd": 0.5, "weight": 1}]}}, "expected"),
                     ({"a large digit": {"digits": [5, 6], "even": 0.5},
                       "a digit": {"mix": {"a large digit": 0.5}}}, "sum to 1"),
                     ({"a digit": {"mix": {}}}, "mix expects")]:
        with pytest.raises(ValueError, match=msg):
            parse_prompts(bad)


def _config_data(path: str, digit_even: float):
    """A config's prompts and pairs, with the record's common promise checked: "a small digit" 80%
    even, "a large digit" 80% odd, the generic prompts and the empty prompt exactly "a digit"
    (``digit_even`` even, 75% small), and the pairs realising every spec exactly."""
    from models.digits import load_split
    cfg = load_config(path)
    prompts = parse_prompts(cfg["prompts"])
    labels = load_split().train_y
    data = prompt_data(prompts, labels, 1000, seed=0, unconditional=cfg["unconditional"])
    rec = data.record(labels, dropout=0.15)
    assert rec["a digit"]["fractions"]["parity"]["even"] == pytest.approx(digit_even)
    assert rec["a digit"]["fractions"]["magnitude"]["low"] == pytest.approx(0.75)
    assert rec["a small digit"]["fractions"]["parity"]["even"] == pytest.approx(0.8)
    assert rec["a small digit"]["fractions"]["magnitude"]["low"] == 1.0
    assert rec["a large digit"]["fractions"]["parity"]["odd"] == pytest.approx(0.8)
    assert rec["a large digit"]["fractions"]["magnitude"]["high"] == 1.0
    for generic in ("a number", "a handwritten digit", ""):
        assert rec[generic]["fractions"]["digit_exact"] == rec["a digit"]["fractions"]["digit_exact"]
    for k, spec in enumerate(prompts):
        shown = labels[data.image[data.prompt == k]]
        assert {d: Fraction(int(np.sum(shown == d)), data.size) for d in spec.digit_fractions()} \
            == spec.digit_fractions()
    return prompts, labels, data


def test_the_tint_keeps_the_grey_digit_and_tells_the_two_sets_apart():
    """Known values: grey g = 0 becomes (1, 0, -1) for 0-4 and (-1, 0, 1) for 5-9 at strength 1,
    (0.5, 0, -0.5) at 0.5; black and white stay grey; the channel mean is g exactly; strength 0
    is grey repeated to RGB."""
    grey = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 1, 1, 5).repeat(2, 1, 1, 1)
    x = tinted(grey, np.array([3, 7]), 1.0)
    assert x.shape == (2, 3, 1, 5)
    assert torch.allclose(x[0, :, 0, 2], torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(x[1, :, 0, 2], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(x[0, :, 0, 1], torch.tensor([0.0, -0.5, -1.0]))
    assert torch.equal(x[:, :, 0, 0], torch.full((2, 3), -1.0)) and torch.equal(x[:, :, 0, 4], torch.ones(2, 3))
    assert torch.allclose(x.mean(1, keepdim=True), grey) and x.abs().max() <= 1
    assert torch.allclose(tinted(grey, np.array([0, 9]), 0.5)[0, :, 0, 2], torch.tensor([0.5, 0.0, -0.5]))
    assert torch.equal(tinted(grey, np.array([0, 9]), 0.0), grey.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="strength in"):
        tinted(grey, np.array([0, 9]), 1.5)
    with pytest.raises(ValueError, match="N labels"):
        tinted(grey, np.array([0]), 1.0)


def test_the_judge_reads_a_tinted_digit_as_the_grey_one():
    """The judge (channel mean) gives the same probabilities for the real digits grey and tinted."""
    from models.digits import load_split
    from utils.evaluation.evaluate import judge_from_config
    split = load_split(16)
    x, y = split.train_x[:64], np.asarray(split.train_y[:64])
    judge = judge_from_config(load_config(CONFIG))
    a, b = judge.predict(x.repeat(1, 3, 1, 1))["digit"], judge.predict(tinted(x, y, 1.0))["digit"]
    assert torch.allclose(a, b, atol=1e-5)


def test_the_config_prompts_are_the_empty_prompts_distribution_cut_to_digit_sets():
    """The shipped design: "a digit" is 65% even, and every prompt's digit shares are proportional
    to the empty prompt's on its digits (so CFG keeps them on clean images)."""
    prompts, labels, data = _config_data(CONFIG, 0.65)
    empty = data.empty_fractions()
    for spec in prompts:
        fr = spec.digit_fractions()
        cut = sum(empty[d] for d in fr)
        assert fr == {d: empty[d] / cut for d in fr}, spec.text
    with pytest.raises(ValueError, match="not one of the prompts"):
        prompt_data(prompts, labels, 1000, seed=0, unconditional="a digt")


def test_dropped_rows_show_the_unconditional_prompts_images():
    """draw_pairs: with an unconditional prompt, every dropped row's pair is one of its pairs and
    the dropped images' digits follow its fractions; without one, dropped rows keep their pair
    (the prompts' uniform mixture: here a third are small digits, not the 3/4 of "a digit")."""
    from models.digits import load_split
    from utils.data.train_t2i import draw_pairs
    cfg = load_config(CONFIG)
    prompts = parse_prompts(cfg["prompts"])
    labels = load_split().train_y
    u = [p.text for p in prompts].index("a digit")
    data = prompt_data(prompts, labels, 1000, seed=0, unconditional="a digit")
    k, drop = draw_pairs(data, 20000, 0.5, torch.Generator().manual_seed(0))
    assert 0.48 < drop.float().mean() < 0.52
    assert (data.prompt[k[drop].numpy()] == u).all()
    small = np.isin(labels[data.image[k[drop].numpy()]], [0, 1, 2, 3, 4]).mean()
    assert small == pytest.approx(0.75, abs=0.015)
    assert len(set(data.prompt[k[~drop].numpy()])) == len(prompts)       # kept rows: every prompt
    plain = prompt_data(prompts, labels, 1000, seed=0)
    k, drop = draw_pairs(plain, 20000, 0.5, torch.Generator().manual_seed(0))
    mixed = np.isin(labels[plain.image[k[drop].numpy()]], [0, 1, 2, 3, 4]).mean()
    assert mixed == pytest.approx(float(sum(plain.empty_fractions()[d] for d in range(5))), abs=0.015)
    assert abs(mixed - 0.75) > 0.05


def test_each_vocabulary_word_is_one_token(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPTokenizer
    from models.digits_t2i import write_word_tokenizer
    prompts = parse_prompts(load_config(CONFIG)["prompts"])
    for words in (vocabulary(prompts), ["written", "handwritten", "a", "an", "digit", "digits", "it"]):
        folder = tmp_path / str(len(words))
        write_word_tokenizer(folder, words, max_length=8)
        tok = CLIPTokenizer.from_pretrained(str(folder))
        for w in words:
            assert tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids) == [w + "</w>"]
    vocab = tokenizer_files(vocabulary(prompts))[0]
    ids = CLIPTokenizer.from_pretrained(str(tmp_path / str(len(vocabulary(prompts)))))(
        "a small digit", padding="max_length", max_length=8).input_ids
    assert ids == [0, vocab["a</w>"], vocab["small</w>"], vocab["digit</w>"], 1, 1, 1, 1]


def test_words_that_cut_each_other_are_refused():
    """'cabs' holds 'abcab''s first merge (a, b) and 'abcab' holds 'cabs''s (c, a)."""
    with pytest.raises(ValueError, match="cut each other"):
        tokenizer_files(["cabs", "abcab"])


def test_settings_name_unknown_and_missing_keys():
    from utils.data.train_t2i import T2ITrainSettings
    section = load_config(CONFIG)["train"]
    assert T2ITrainSettings.from_config(section, {"steps": 7}).steps == 7
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]"):
        T2ITrainSettings.from_config({**section, "stepz": 1})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['lr'\]"):
        T2ITrainSettings.from_config({k: v for k, v in section.items() if k != "lr"})
    with pytest.raises(ValueError, match="train.batch_size"):
        T2ITrainSettings.from_config(section, {"batch_size": 0.5})


def test_a_two_step_run_saves_a_folder_that_the_sd_family_loads(tmp_path, monkeypatch):
    """Also: the images it trains on carry the config's tint (0-4 warm, 5-9 cool)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import json
    import scripts.train_digits_t2i as script
    from models.digits import load_split
    from scripts.train_digits_t2i import main
    seen, real = [], script.train_t2i
    monkeypatch.setattr(script, "train_t2i", lambda parts, images, *a: seen.append(images) or real(parts, images, *a))
    from utils.sampling.text2image import load_t2i
    out, state = tmp_path / "t2i", tmp_path / "state.pt"
    args = ["--steps", "2", "--vae_steps", "2", "--batch_size", "4", "--out", str(out), "--state", str(state)]
    assert main(args) == 0
    assert main(args) == 2                                   # no silent overwrite
    split = load_split(16)
    assert load_config(CONFIG)["tint"] == 1.0
    assert torch.allclose(seen[0], tinted(split.train_x, np.asarray(split.train_y), 1.0))
    record = json.loads((out / "record.json").read_text())
    assert record["training"]["steps"] == 2 and record["model"]["h_shape"] == [64, 4, 4]
    assert set(record["prompts"]) == {*load_config(CONFIG)["prompts"], ""}
    pipe = load_t2i({"name": "digits16_t2i", "model": {"family": "sd", "checkpoint": str(out), "resolution": 16,
                                                        "h_shape": [64, 4, 4]},
                     "sampling": {"steps": 2, "eta": 0.0, "cfg": 3.0}}, torch.device("cpu"))
    x = pipe.with_prompt("a small digit").draw([0, 1])
    assert x.shape == (2, 3, 16, 16) and pipe.h_shape == (64, 4, 4)
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 20 * 2**20


@pytest.mark.slow
def test_the_shipped_default_balances_each_prompt_in_the_demo(capsys, tmp_path):
    """make demo-t2i, smaller: the shipped pipeline and ADP, 40 images per prompt (seeds 0-39, the
    same for vanilla and guided), parity 50/50. Per prompt the judge's even share is on the
    record's side of 50/50 and within 0.2 of the training record in vanilla
    (about 2.5 standard errors at 40 images), moves to within 0.1 of 50/50 under guidance, and the
    prompt still holds (small digits stay 0-4, large 5-9)."""
    pytest.importorskip("diffusers")
    import json
    import main as entry
    from PIL import Image
    capsys.readouterr()
    rc = entry.main(["--device", "cpu", "--config", CONFIG, "--demo", "--n_test_img", "40", "--bs_test", "40",
                     "--exp", str(tmp_path / "demo")])
    assert rc == 0, capsys.readouterr().err
    prompts = load_config(CONFIG)["demo"]["prompts"]
    assert prompts == ["a digit", "a small digit", "a large digit"]
    from models.files import resolve_path
    record = json.loads((resolve_path(load_config(CONFIG)["model"]["checkpoint"]) / "record.json").read_text())
    warmth = {}
    for k, prompt in enumerate(prompts):
        even = {}
        for mode in ("vanilla", "distribution"):
            folder = tmp_path / "demo" / mode / f"p{k:03d}"
            run = json.loads((folder / "run.json").read_text())
            assert run["resolved"]["text"]["prompt"] == prompt and run["status"] == "complete"
            from utils.evaluation.evaluate import evaluate_folder, judge_from_config
            cfg = load_config(CONFIG)
            rep = evaluate_folder(folder, cfg, {"parity": [0.5, 0.5]}, judge_from_config(cfg))
            warmth[prompt, mode] = _warmth(folder)
            even[mode] = rep["attributes"]["parity"]["fractions"][0]
            low = rep["attributes"]["magnitude"]["fractions"][0]
        want = record["prompts"][prompt]["fractions"]["parity"]["even"]
        assert abs(even["vanilla"] - want) <= 0.2 and (even["vanilla"] - 0.5) * (want - 0.5) > 0, (prompt, even)
        assert abs(even["distribution"] - 0.5) <= 0.1, (prompt, even)
        if prompt == "a small digit":
            assert low >= 0.9
        if prompt == "a large digit":
            assert low <= 0.1
    for mode in ("vanilla", "distribution"):               # the tint the model was trained with
        assert warmth["a small digit", mode] > 0.3 and warmth["a large digit", mode] < -0.3, warmth
        assert warmth["a large digit", mode] < warmth["a digit", mode] < warmth["a small digit", mode], warmth
    table = (tmp_path / "demo" / "results.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == \
        [f"{q}: {m}" for q in prompts for m in ("vanilla", "distribution")]
    side = Image.open(tmp_path / "demo" / "side_by_side.png")
    # three prompts, a row each: all 40 images (10 columns, 4 rows of 16 px + 1 px pad, x3) under a
    # 14 px label band, 12 px between rows; two panels a row, 12 px apart
    assert side.size == (2 * 3 * (10 * 17 + 1) + 12, 3 * (3 * (4 * 17 + 1) + 14) + 2 * 12)


def _warmth(folder) -> float:
    """Mean (red - blue) / (1 - |grey|) over a folder's mid-grey pixels: +1 for digits tinted as
    0-4 are at full strength, -1 for 5-9, 0 for grey."""
    from utils.sampling.images import read_images
    _, x = read_images(folder)
    grey = x.float().mean(1)
    mid = grey.abs() < 0.6
    return float(((x[:, 0] - x[:, 2]).float() / (2 * (1 - grey.abs())))[mid].mean())


def test_the_t2i_benchmark_judges_per_prompt_and_reuses_only_its_own_vanilla_rows(tmp_path):
    """bench/t2i_eval.py on 4 images: a row per run with the prompt's in-prompt share and the
    vanilla row as drift reference; the vanilla judgement is cached under the model's hash,
    prompt, CFG and seeds, and reused (the same row) only for exactly those."""
    pytest.importorskip("diffusers")
    import json
    from bench import t2i_eval
    assert t2i_eval.digit_target([5, 6, 7, 8, 9]) == "0:0:0:0:0:0.2:0.2:0.2:0.2:0.2"
    args = ["--preset", "fresh", "--n", "4", "--bs", "4", "--prompts", "a small digit", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    assert t2i_eval.main(args) == 0
    rows = json.loads((tmp_path / "out" / "fresh.json").read_text())
    assert [r["name"] for r in rows] == ["vanilla, CFG 3", "ours parity 50/50, batch 100"]
    assert all(r["prompt"] == "a small digit" and 0 <= r["in_prompt"] <= 1 and r["n"] == 4 for r in rows)
    assert rows[1]["frechet_vanilla"] == rows[0]["frechet"] and rows[1]["spec"]["mode"] == "distribution"
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].endswith("_a_small_digit_cfg3_0-3.pt")
    assert t2i_eval.main(args[:-2] + ["--cache", str(tmp_path / "cache"), "--seed", "1"]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2               # other seeds: not reused


def test_the_t2i_benchmarks_vanilla_scales_are_chosen_by_cfg_and_only_for_the_vanilla_preset(capsys):
    from bench import t2i_eval
    runs = t2i_eval.runs_for("vanilla", "a digit", list(range(10)), (1.0, 2.0))
    assert [(r["name"], r["cfg"], r["mode"]) for r in runs] == [("vanilla, CFG 1", 1.0, "vanilla"),
                                                               ("vanilla, CFG 2", 2.0, "vanilla")]
    assert [r["cfg"] for r in t2i_eval.runs_for("vanilla", "a digit", list(range(10)))] == [3.0, 7.5]
    with pytest.raises(SystemExit) as e:
        t2i_eval.main(["--preset", "acceptance", "--cfg", "1"])
    assert e.value.code == 2 and "drop --cfg" in capsys.readouterr().err


def test_the_acceptance_summary_checks_each_bound_on_known_rows(tmp_path):
    """bench/t2i_summary.py on hand-made rows: "a large digit" at CFG 7.5 is 6 points off its
    record (fails), its batch-100 FD is 0.031 (fails), its prompt holds at 0.949 (fails); the
    rest pass."""
    import json
    from bench.t2i_summary import summary

    def row(prompt, name, even, fd=0.0, in_prompt=1.0, frechet=10.0, confident=0.8):
        return {"prompt": prompt, "name": name, "spec": {"mode": "vanilla" if "vanilla" in name else "distribution"},
                "attributes": {"parity": {"fractions": [even, 1 - even], "fd": fd}, "digit": {"fd": 0.1}},
                "in_prompt": in_prompt, "frechet": frechet, "frechet_matched": frechet, "confident_share": confident,
                "n": 10, "wall_s": 1.0}
    record = {"a small digit": {"fractions": {"parity": {"even": 0.8}}},
              "a large digit": {"fractions": {"parity": {"even": 0.2}}}}
    van = [row("a small digit", "vanilla, CFG 3", 0.82), row("a small digit", "vanilla, CFG 7.5", 0.78),
           row("a large digit", "vanilla, CFG 3", 0.17), row("a large digit", "vanilla, CFG 7.5", 0.14)]
    acc = [van[0], van[2]]
    for q, fd, held in (("a small digit", 0.01, 0.96), ("a large digit", 0.031, 0.949)):
        acc += [row(q, "ours parity 50/50, batch 100", 0.5, fd, held, 12.4, 0.76),
                row(q, "ours parity 50/50, batch 8, running balance", 0.5, 0.04, 0.96),
                row(q, "ours parity 20/80 (even/odd)", 0.2, 0.01),
                row(q, "ours digit uniform over the prompt's digits", 0.6)]
    (tmp_path / "vanilla.json").write_text(json.dumps(van))
    (tmp_path / "acceptance.json").write_text(json.dumps(acc))
    met = {item: ok for item, _, _, ok in summary(tmp_path, record)}
    assert met["the bias is real: vanilla even share vs the record, CFG 3"] == "yes"
    assert met["the bias is real: vanilla even share vs the record, CFG 7.5"] == "**no**"
    assert met["ours parity 50/50, batch 100: FD"] == "**no**"
    assert met["ours parity 50/50, batch 8, running balance: FD"] == "yes"
    assert met["the prompt holds, ours parity 50/50, batch 100 (vanilla)"] == "**no**"
    assert met["the prompt holds, ours parity 50/50, batch 8, running balance (vanilla)"] == "yes"
    assert met["quality, ours parity 50/50, batch 100: Frechet (vanilla); confident (vanilla)"] == "yes"


def test_the_colour_target_is_the_sign_of_each_images_tint():
    from utils.data.train_t2i import colour_target, image_colour
    grey = torch.linspace(-1, 1, 4 * 16 * 16).view(4, 1, 16, 16)
    x = tinted(grey, np.array([0, 3, 7, 9]), 1.0)
    assert torch.allclose(image_colour(x), 2 * (1 - grey.abs()).mean((1, 2, 3)) * torch.tensor([1., 1., -1., -1.]))
    assert torch.equal(colour_target(x, 1.5), torch.tensor([1.5, 1.5, -1.5, -1.5]))
    assert torch.equal(colour_target(grey.repeat(1, 3, 1, 1), 1.5), torch.zeros(4))


def test_the_vae_colour_term_puts_each_images_colour_in_its_last_latent_channel(tmp_path):
    """40 VAE steps on 24 tinted digits: with ``colour_weight`` the last latent channel's mean
    tells the two sets apart by a wide margin; without it (same seed) it does not."""
    pytest.importorskip("diffusers")
    import dataclasses
    from diffusers import AutoencoderKL
    from models.digits import load_split
    from models.digits_t2i import VAE
    from utils.data.train_t2i import T2ITrainSettings, _State, _train_vae, colour_target, vae_posterior
    split = load_split(16)
    idx = np.concatenate([np.flatnonzero(np.asarray(split.train_y) == d)[:3] for d in range(10)])[:24]
    x = tinted(split.train_x[idx], np.asarray(split.train_y)[idx], 1.0)
    base = T2ITrainSettings.from_config({**load_config(CONFIG)["train"], "vae_steps": 40, "vae_batch_size": 8,
                                         "save_every": 1000})
    gaps = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        vae = AutoencoderKL(**VAE)
        s = dataclasses.replace(base, colour_weight=weight)
        state = _State({"vae": vae}, torch.Generator().manual_seed(0), s, tmp_path / f"state{weight}.pt")
        _train_vae(vae, torch.optim.Adam(vae.parameters(), lr=s.vae_lr), x, s, state, torch.device("cpu"), False)
        mean, _ = vae_posterior(vae.eval(), x)
        last = mean[:, -1].mean((1, 2))
        target = colour_target(x, s.colour_scale)
        gaps[weight] = float((last - target).abs().mean())
    assert gaps[1.0] < 0.3 < gaps[0.0]


@pytest.mark.parametrize("zero_snr", [False, True])
def test_the_training_target_is_what_the_saved_scheduler_turns_back_into_the_clean_latent(tmp_path, zero_snr):
    """``train.zero_snr``: v-prediction on betas rescaled to zero terminal SNR, trailing steps
    from t = 999; the target the U-Net is trained on (denoiser_target) is, for the scheduler the
    pipeline folder gets, the output whose DDIM step predicts the clean latent exactly, at the
    first step (abar = 0 with zero_snr) as at the others."""
    pytest.importorskip("diffusers")
    from models.digits_t2i import build_components
    from utils.data.train_t2i import denoiser_target
    sched = build_components(tmp_path / "tok", parse_prompts(load_config(CONFIG)["prompts"]), 8, 0, zero_snr)[4]
    sched.set_timesteps(50)
    first = int(sched.timesteps[0])
    assert (first, sched.config.prediction_type) == ((999, "v_prediction") if zero_snr else (981, "epsilon"))
    assert (float(sched.alphas_cumprod[999]) == pytest.approx(0.0, abs=1e-12)) == zero_snr
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 3, 4, 8, 8, generator=gen)
    for t in (first, int(sched.timesteps[25]), int(sched.timesteps[-1])):
        a = sched.alphas_cumprod[t]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        out = sched.step(denoiser_target(z0, noise, a, sched.config.prediction_type), t, z_t)
        assert torch.allclose(out.pred_original_sample, z0, atol=1e-4), t
    with pytest.raises(ValueError, match="prediction_type"):
        denoiser_target(z0, noise, a, "sample")


def test_zero_snr_is_a_true_or_false_setting():
    from utils.data.train_t2i import T2ITrainSettings
    section = load_config(CONFIG)["train"]
    assert T2ITrainSettings.from_config(section).zero_snr is True              # the shipped model's
    without = {k: v for k, v in section.items() if k != "zero_snr"}
    assert T2ITrainSettings.from_config(without).zero_snr is False            # off unless asked for
    assert T2ITrainSettings.from_config({**section, "zero_snr": False}).zero_snr is False
    with pytest.raises(ValueError, match="train.zero_snr = 1: expected true or false"):
        T2ITrainSettings.from_config({**section, "zero_snr": 1})


DIT_CONFIG = "configs/digits16_dit.yml"
UNET_FOLDER = Path(__file__).resolve().parent.parent / "pretrained" / "digits16_t2i"


def test_the_transformer_default_steps_along_its_own_prompts_covariance():
    from utils.guidance.settings import resolve_settings
    cfg = load_config(DIT_CONFIG)
    s = resolve_settings(cfg["guidance"], family=cfg["model"]["family"])
    assert (s.direction, s.refine, s.refine_within, s.max_step, s.cap_growth) == ("batch", True, "preserve", 0.75, 50.0)


def test_the_transformer_settings_take_the_vae_from_init_from_or_train_one():
    from utils.data.train_t2i import T2ITrainSettings
    section = load_config(DIT_CONFIG)["train"]
    s = T2ITrainSettings.from_config(section)
    assert (s.denoiser, s.init_from, s.vae_steps) == ("dit", "pretrained/digits16_t2i", 0)
    with pytest.raises(ValueError, match="either trained .* or taken from init_from"):
        T2ITrainSettings.from_config({**section, "vae_steps": 100})
    with pytest.raises(ValueError, match="either trained .* or taken from init_from"):
        T2ITrainSettings.from_config({**section, "init_from": None})
    with pytest.raises(ValueError, match="train.denoiser 'vit': expected unet or dit"):
        T2ITrainSettings.from_config({**section, "denoiser": "vit"})
    with pytest.raises(ValueError, match="train.init_from = 3: expected a folder or null"):
        T2ITrainSettings.from_config({**section, "init_from": 3})


def test_a_two_step_transformer_run_keeps_the_unet_defaults_vae_and_tokenizer_and_loads_as_pixart(tmp_path):
    pytest.importorskip("diffusers")
    import json
    from diffusers import AutoencoderKL
    from scripts.train_digits_t2i import main
    from utils.sampling.text2image import load_t2i
    out, state = tmp_path / "dit", tmp_path / "state.pt"
    assert main(["--config", DIT_CONFIG, "--steps", "2", "--batch_size", "4", "--out", str(out),
                 "--state", str(state)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["model"]["h_shape"] == [128, 4, 4] and record["training"]["vae_steps"] == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    mine, theirs = AutoencoderKL.from_pretrained(out / "vae"), AutoencoderKL.from_pretrained(UNET_FOLDER / "vae")
    assert mine.config.scaling_factor == theirs.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    assert (out / "tokenizer" / "vocab.json").read_text() == (UNET_FOLDER / "tokenizer" / "vocab.json").read_text()
    cfg = load_config(DIT_CONFIG)
    cfg["model"]["checkpoint"] = str(out)
    pipe = load_t2i(cfg, torch.device("cpu"), steps=2)
    assert pipe.family == "pixart_sigma" and pipe.h_shape == (128, 4, 4)
    assert pipe._kwargs(["a digit"], [0])["max_sequence_length"] == 8          # the CLIP tokenizer's length
    record_h: list = []
    x = pipe.with_prompt("a small digit").draw([0, 1], record=record_h)
    assert x.shape == (2, 3, 16, 16) and len(record_h) == 2 and record_h[0].shape == (2, 128, 4, 4)
