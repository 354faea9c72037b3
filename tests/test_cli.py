"""main.py's command line (utils/app/cli.py): bad input exits 2 with a clear message, before sampling.

The embedded digits16 model is loaded (small, fast); the ADP is a tiny untrained one written to
tmp_path for that model. Sampling is patched to fail, so no test here can generate an image.
"""
import argparse

import pytest
import torch

import main as entry
from diffusion_latent import raw_targets
from models.adp import ADP
from models.files import file_sha256, resolve_path
from utils.guidance.targets import parse_fraction_vector, parse_scales
from utils.sampling.diffusion import DDIMSampler, ddim_timesteps

ATTRS = {"parity": ["even", "odd"], "magnitude": ["low", "high"], "digit": [str(d) for d in range(10)]}
CKPT = "pretrained/digits16_ddpm.pt"


@pytest.fixture(scope="module")
def model_sha():
    return file_sha256(resolve_path(CKPT))


def _write_adp(path, sha):
    adp = ADP((64, 4, 4), ddim_timesteps(1000, 50), ATTRS)
    with torch.no_grad():
        for a in ATTRS:
            getattr(adp, f"dir_{a}").fill_(1e-3)          # the 'ours' preset steps along these
    adp.class_prior = {a: [1 / len(c)] * len(c) for a, c in ATTRS.items()}   # and refines within these
    adp.save(path, {"config": "digits16", "checkpoint": CKPT, "checkpoint_sha256": sha},
             {"source": "test"}, {})
    return path


@pytest.fixture
def adp_path(tmp_path, model_sha):
    return _write_adp(tmp_path / "adp.pt", model_sha)


@pytest.fixture(autouse=True)
def no_sampling(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a CLI error test reached sampling")
    monkeypatch.setattr(DDIMSampler, "sample", refuse)


def _main(capsys, tmp_path, *argv):
    """Run main.py's main; returns (exit code, stderr)."""
    capsys.readouterr()
    rc = entry.main(["--device", "cpu", "--exp", str(tmp_path / "out"), *argv])
    return rc, capsys.readouterr().err


def _dist(adp_path, *extra):
    return ("--mode", "distribution", "--adp", str(adp_path), "--n_test_img", "4", "--bs_test", "4",
            *extra)


@pytest.mark.parametrize("target, message", [
    ("parity=-0.2:1.2", "must be >= 0"),
    ("parity=0.3:0.3", "must sum to 1"),
    ("digit=0.5:0.5", "has 2 fractions but the attribute has 10 classes"),
    ("colour=0.5", "the ADP has no attribute ['colour']"),
    ("parity", "expected attr=value pairs"),
    ("parity*magnitude=0.25:0.25:0.25:0.5", "must sum to 1"),
    ("parity*magnitude=0.5:0.5", "has 2 fractions but the attribute has 4 classes"),
    ("parity*colour=uniform", "the ADP has no attribute ['colour']"),
])
def test_bad_targets_exit_2(capsys, tmp_path, adp_path, target, message):
    rc, err = _main(capsys, tmp_path, *_dist(adp_path, "--target", target))
    assert rc == 2
    assert "error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_scale_not_a_number(capsys, tmp_path, adp_path):
    rc, err = _main(capsys, tmp_path, *_dist(adp_path, "--target", "parity=0.5", "--scale", "abc"))
    assert rc == 2 and "'abc' is not a number" in err


def test_batch_of_one_in_distribution_mode(capsys, tmp_path, adp_path):
    rc, err = _main(capsys, tmp_path, "--mode", "distribution", "--adp", str(adp_path),
                    "--target", "parity=0.5", "--bs_test", "1", "--no-running_balance")
    assert rc == 2 and "--bs_test >= 2" in err and "the batch is the unit of guidance" in err


def test_running_balance_needs_distribution_mode(capsys, tmp_path, adp_path):
    rc, err = _main(capsys, tmp_path, "--mode", "sample", "--adp", str(adp_path),
                    "--target", "parity=odd", "--running_balance")
    assert rc == 2 and "--running_balance applies to distribution guidance" in err


def test_joint_target_needs_distribution_mode(capsys, tmp_path, adp_path):
    rc, err = _main(capsys, tmp_path, "--mode", "sample", "--adp", str(adp_path),
                    "--target", "parity*magnitude=0")
    assert rc == 2 and "need --mode distribution" in err


def test_batch_of_one_with_running_balance_reaches_sampling(capsys, tmp_path, adp_path):
    with pytest.raises(AssertionError, match="reached sampling"):
        _main(capsys, tmp_path, "--mode", "distribution", "--adp", str(adp_path),
              "--target", "parity*magnitude=uniform", "--bs_test", "1", "--running_balance")


@pytest.mark.parametrize("mode, target", [("distribution", "parity=0.5"), ("sample", "parity=odd")])
def test_missing_check_classifier_exit_2(capsys, tmp_path, adp_path, mode, target):
    rc, err = _main(capsys, tmp_path, "--mode", mode, "--adp", str(adp_path), "--target", target,
                    "--labeller", "nope.onnx")
    assert rc == 2 and "labeller 'nope.onnx' not found" in err and "--no-check" in err
    assert not (tmp_path / "out").exists()


def test_no_check_reaches_sampling(capsys, tmp_path, adp_path):
    with pytest.raises(AssertionError, match="reached sampling"):
        _main(capsys, tmp_path, "--mode", "sample", "--adp", str(adp_path), "--target", "parity=odd",
              "--labeller", "nope.onnx", "--no-check")


@pytest.mark.parametrize("yaml_text, message", [
    ("guidance: {max_stpe: 2}", "unknown guidance setting(s) ['max_stpe']"),
    ("guidance: {estimator: quotaa}", "'quotaa' is not one of ['soft', 'quota', 'auto']"),
    ("guidance: {preset: nope}", "unknown guidance preset 'nope'"),
    ("guidance: {max_step: two}", "must be a finite number >= 0"),
    ("guidance: {running_balance: 1}", "must be true or false"),
])
def test_bad_guidance_settings_exit_2_naming_the_key(capsys, tmp_path, adp_path, yaml_text, message):
    base = resolve_path("configs/digits16.yml").read_text().split("\nguidance:")[0]
    cfg = tmp_path / "bad.yml"
    cfg.write_text(base + "\n" + yaml_text + "\n")
    rc, err = _main(capsys, tmp_path, "--config", str(cfg), *_dist(adp_path, "--target", "parity=0.5"))
    assert rc == 2 and message in err, err
    if "max_stpe" in message:
        assert "allowed:" in err and "max_step" in err
    assert not (tmp_path / "out").exists()


def test_unknown_preset_on_the_command_line_is_an_argparse_error(capsys, tmp_path, adp_path):
    with pytest.raises(SystemExit) as e:
        _main(capsys, tmp_path, *_dist(adp_path, "--target", "parity=0.5", "--preset", "nope"))
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_guidance_flags_with_vanilla_are_an_error(capsys, tmp_path):
    rc, err = _main(capsys, tmp_path, "--mode", "vanilla", "--preset", "paper")
    assert rc == 2 and "apply to --mode sample or distribution" in err


def test_missing_checkpoint_names_path_and_config(capsys, tmp_path):
    rc, err = _main(capsys, tmp_path, "--mode", "vanilla", "--checkpoint", "nope.pt")
    assert rc == 2
    assert str(resolve_path("nope.pt")) in err and "digits16" in err


def test_non_empty_exp_is_left_untouched(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("precious")
    mtime = keep.stat().st_mtime_ns
    rc, err = _main(capsys, tmp_path, "--mode", "vanilla", "--n_test_img", "2", "--bs_test", "2")
    assert rc == 2 and "not empty" in err and "--overwrite" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert keep.read_text() == "precious" and keep.stat().st_mtime_ns == mtime


def test_adp_of_another_model_is_refused(capsys, tmp_path):
    other = _write_adp(tmp_path / "other.pt", "f" * 64)
    rc, err = _main(capsys, tmp_path, *_dist(other, "--target", "parity=0.5"))
    assert rc == 2 and "A classifier must match its model" in err and str(other) in err


def test_adp_of_another_grid_is_refused(capsys, tmp_path, adp_path):
    rc, err = _main(capsys, tmp_path, *_dist(adp_path, "--target", "parity=0.5", "--steps", "20"))
    assert rc == 2 and "no head for timestep" in err


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        entry.main(["--no_such_flag", "1"])
    assert e.value.code == 2
    assert "--no_such_flag" in capsys.readouterr().err


# ---- the guidance-settings flags: generated from the settings' fields ---------------------------
def _settings_actions():
    """{flag dest: its argparse group title} of main.py's parser."""
    from utils.app.cli import build_parser
    return {a.dest: group.title for group in build_parser()._action_groups for a in group._group_actions}


def test_every_guidance_settings_flag_is_a_field_of_the_table():
    import dataclasses
    from utils.app.cli import SETTINGS_GROUP
    from utils.guidance.settings import CLI_FIELDS, COMPOSITE_FLAGS, GuidanceSettings
    fields = {f.name for f in dataclasses.fields(GuidanceSettings)}
    composite = {f for targets, _, _ in COMPOSITE_FLAGS.values() for f in targets}
    assert set(CLI_FIELDS) <= fields and composite <= fields
    groups = _settings_actions()
    in_group = {dest for dest, title in groups.items() if title == SETTINGS_GROUP}
    assert in_group == set(CLI_FIELDS) | set(COMPOSITE_FLAGS)          # nothing hand-added to the group
    # no flag elsewhere in the parser is named after a setting (it would bypass the table)
    elsewhere = {dest for dest, title in groups.items() if title != SETTINGS_GROUP}
    assert not elsewhere & (fields | composite | set(COMPOSITE_FLAGS)), elsewhere & fields


def test_every_field_of_the_table_gets_a_flag_that_reaches_the_overrides():
    from utils.app.cli import build_parser
    from utils.guidance.settings import CHOICES, CLI_FIELDS, PRESETS, overrides_from_args, resolve_settings
    parser = build_parser()
    assert overrides_from_args(parser.parse_args([])) == dict.fromkeys(CLI_FIELDS)   # not given: None
    for name in CLI_FIELDS:
        choices = sorted(PRESETS) if name == "preset" else CHOICES.get(name)
        if choices is None:                                            # a bool field
            assert overrides_from_args(parser.parse_args([f"--{name}"]))[name] is True
            assert overrides_from_args(parser.parse_args([f"--no-{name}"]))[name] is False
            continue
        for value in choices:
            overrides = overrides_from_args(parser.parse_args([f"--{name}", value]))
            assert overrides[name] == value
            if name != "preset":
                assert getattr(resolve_settings(None, overrides), name) == value
    overrides = overrides_from_args(parser.parse_args(["--guide_steps", "3:20"]))
    assert (overrides["first_step"], overrides["last_step"]) == (3, 20)


# ---- parsing helpers ---------------------------------------------------------------------------
def test_parse_fraction_vector():
    torch.testing.assert_close(parse_fraction_vector("parity", "0.3", ["even", "odd"]),
                               torch.tensor([0.7, 0.3]))                 # binary: fraction of class 1
    torch.testing.assert_close(parse_fraction_vector("digit", "uniform", ATTRS["digit"]),
                               torch.full((10,), 0.1))
    torch.testing.assert_close(parse_fraction_vector("m", "0.25/0.75", ["low", "high"]),
                               torch.tensor([0.25, 0.75]))
    v = parse_fraction_vector("parity", "1:0", ["even", "odd"])     # zeros smoothed for chi2
    assert (v > 0).all() and float(v.sum()) == pytest.approx(1.0) and v[0] > 0.99
    for bad, msg in [("x", "not a number"), ("0.5:0.5:0", "3 fractions"), ("1.5", r"must be in \[0, 1\]")]:
        with pytest.raises(ValueError, match=msg):
            parse_fraction_vector("parity", bad, ["even", "odd"])


def test_parse_scales():
    attrs = ["parity", "digit"]
    default = {"parity": 3.0, "digit": 1.0}
    assert parse_scales(None, attrs, default) == {"parity": 3.0, "digit": 1.0}
    assert parse_scales("2", attrs, default) == {"parity": 2.0, "digit": 2.0}
    assert parse_scales("parity=2,digit=0.5", attrs, default) == {"parity": 2.0, "digit": 0.5}
    # the original's list: one scale per attribute, in order
    assert parse_scales("1500,700", attrs, default) == {"parity": 1500.0, "digit": 700.0}
    for bad, msg in [("abc", "not a number"), ("-1", ">= 0"), ("inf", "finite"),
                     ("colour=1", "not guided"), ("1,2,3", "3 values for 2"),
                     ("1,digit=2", "not both")]:
        with pytest.raises(ValueError, match=msg):
            parse_scales(bad, attrs, default)


def _args(**kw):
    base = dict(target=None, attribute_list=None, male=None)
    return argparse.Namespace(**{**base, **kw})


def test_parse_targets():
    with pytest.raises(ValueError, match="names 'parity' twice"):
        raw_targets(_args(target="parity=0.9,parity=0.1"), "distribution", ATTRS)
    with pytest.raises(ValueError, match="must be a class index"):
        raw_targets(_args(attribute_list="1,0,0", male=0.7), "sample", ATTRS)
    assert raw_targets(_args(target="parity=0.5, digit=uniform"), "distribution", ATTRS) == \
        {"parity": "0.5", "digit": "uniform"}
    assert raw_targets(_args(attribute_list="1,0,0", male=0.3), "distribution", ATTRS) == \
        {"parity": "0.3"}
    assert raw_targets(_args(attribute_list="0,1,0", male=1.0), "sample", ATTRS) == \
        {"magnitude": "1"}
    # sample mode, several attributes: --male indexes their joint classes, first attribute slowest
    for male, want in [(0, ("0", "0")), (1, ("0", "1")), (2, ("1", "0")), (3, ("1", "1"))]:
        assert raw_targets(_args(attribute_list="1,1,0", male=float(male)), "sample", ATTRS) == \
            {"parity": want[0], "magnitude": want[1]}
    assert raw_targets(_args(attribute_list="1,0,1", male=13.0), "sample", ATTRS) == \
        {"parity": "1", "digit": "3"}
    with pytest.raises(ValueError, match=r"class index 0\.\.3"):
        raw_targets(_args(attribute_list="1,1,0", male=4.0), "sample", ATTRS)
    with pytest.raises(ValueError, match="needs --male"):
        raw_targets(_args(attribute_list="1,0,0"), "distribution", ATTRS)
    with pytest.raises(ValueError, match="one 0/1 switch per ADP attribute"):
        raw_targets(_args(attribute_list="1,2,0", male=0.5), "distribution", ATTRS)
    with pytest.raises(ValueError, match="one 0/1 switch per ADP attribute"):   # 4th switch on, 3 heads
        raw_targets(_args(attribute_list="0,0,0,1", male=0.5), "distribution", ATTRS)
    assert raw_targets(_args(attribute_list="1,0,0,0", male=0.5), "distribution", ATTRS) == \
        {"parity": "0.5"}                                                       # original's 4 switches
    with pytest.raises(ValueError, match="no attribute selected"):
        raw_targets(_args(attribute_list="0,0,0", male=0.5), "distribution", ATTRS)
    with pytest.raises(ValueError, match="needs --target"):
        raw_targets(_args(), "distribution", ATTRS)
