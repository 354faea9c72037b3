"""The typed run configuration (utils/config.py): one place for the sampling defaults, every key
checked, and every shipped config read through it."""
from pathlib import Path

import pytest
import yaml

import main as entry
from utils.app.config import load_config
from utils.config import DEFAULT_N_IMAGES, RunConfig

ROOT = Path(__file__).resolve().parent.parent
UNCOND = {"model": {"family": "ddpm", "checkpoint": "x.pt"}, "diffusion": {}}
T2I = {"model": {"family": "sd", "checkpoint": "folder"}}


def test_the_sampling_defaults_depend_on_the_family_only_where_they_must():
    u, t = RunConfig.of(UNCOND), RunConfig.of(T2I)
    assert (u.sampling.steps, u.sampling.skip_type, u.sampling.cfg) == (50, "uniform", 7.5)
    assert (u.eta, t.eta) == (1.0, 0.0)              # the original's DDIM eta; the pipelines' deterministic
    assert RunConfig.of({**T2I, "sampling": {"eta": 0.5}}).eta == 0.5
    assert RunConfig.of(UNCOND).demo.n == DEFAULT_N_IMAGES == 100
    assert RunConfig.of({**T2I, "demo": {"prompts": ["a", "b"], "n": 8}}).demo.prompts == ("a", "b")


@pytest.mark.parametrize("cfg, message", [
    ({**UNCOND, "sampling": {"stpes": 20}}, r"sampling: unknown key\(s\) \['stpes'\]"),
    ({**UNCOND, "adpp": "x.pt"}, r"unknown key\(s\) \['adpp'\]"),
    ({**UNCOND, "sampling": {"steps": 0}}, r"sampling.steps is 0; it must be an integer >= 1"),
    ({**T2I, "sampling": {"cfg": 0.5}}, r"sampling.cfg is 0.5; it must be a number >= 1"),
    ({**UNCOND, "sampling": {"eta": True}}, r"sampling.eta is True"),
    ({**UNCOND, "demo": {"n": "ten"}}, r"demo.n is 'ten'"),
    ({**UNCOND, "adp": 3}, r"adp is 3; it must be a string"),
    ({**UNCOND, "judge": ["a"]}, r"judge is \['a'\]"),
    ({**UNCOND, "tint": "warm"}, r"tint is 'warm'"),
    ({"model": {"family": "ddpm"}}, r"has no diffusion: section"),
    ({"sampling": {}}, r"has no model: section"),
])
def test_a_bad_key_or_value_is_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.of(cfg)


def test_a_guidance_part_needs_no_model_and_the_mapping_is_not_changed():
    part = {"guidance": {"preset": "ours"}}
    rc = RunConfig.of(part, require_model=False)
    assert rc.family is None and rc.guidance == {"preset": "ours"} and part == {"guidance": {"preset": "ours"}}


def test_every_shipped_config_reads():
    for path in sorted((ROOT / "configs").glob("*.yml")):
        rc = RunConfig.of(load_config(path))
        assert rc.name == path.stem and rc.family


def test_the_command_line_refuses_a_misspelt_config_key(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs/digits16.yml").read_text())
    cfg["sampling"]["setps"] = 10
    path = tmp_path / "typo.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert entry.main(["--config", str(path), "--n_test_img", "2", "--exp", str(tmp_path / "out")]) == 2
    assert "sampling: unknown key(s) ['setps']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
