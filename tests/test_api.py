"""The Python API (utils/app/api.py): the Python blocks of README.md and docs/python-api.md run as written, the API's
images equal the command line's for the same seeds, and the hook is gone after the block, also
after an exception."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

import diffusion_latent  # noqa: E402
import main as entry  # noqa: E402
from utils.sampling.images import read_png, to_uint8  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks() -> list[str]:
    """The Python blocks of docs/python-api.md."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S)


def test_the_readmes_from_python_blocks_run_as_written(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = readme_blocks()
    assert len(blocks) == 2
    first: dict = {}
    exec(blocks[0], first)
    batches = first["guide"].report()["batches"]
    assert len(first["images"]) == 8 and [b["images"] for b in batches] == [8]
    assert batches[0]["guided_steps"] == 50 and set(batches[0]["estimate"]) == {"parity"}
    assert not first["pipe"].unet.mid_block._forward_hooks                # the hook is gone
    second: dict = {}
    exec(blocks[1], second)
    assert tuple(second["images"].shape) == (8, 1, 16, 16)
    assert not torch.equal(second["images"], second["vanilla"])
    (readme,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    third: dict = {}
    exec(readme, third)
    assert len(third["images"]) == 8 and not third["pipe"].unet.mid_block._forward_hooks


def test_the_apis_images_are_the_command_lines(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from diffusers import DiffusionPipeline
    prompt, seeds = "a small digit", list(range(6))
    rc = entry.main(["--config", "configs/digits16_t2i.yml", "--prompt", prompt, "--mode", "distribution",
                     "--target", "parity=0.5", "--seeds", "0-5", "--bs_test", "6", "--no-check",
                     "--exp", str(tmp_path / "cli")])
    assert rc == 0, capsys.readouterr().err
    pipe = DiffusionPipeline.from_pretrained("pretrained/digits16_t2i")
    pipe.set_progress_bar_config(disable=True)
    guide = diffusion_latent.balance(pipe, "pretrained/digits16_t2i_adp.pt", {"parity": 0.5},
                                     config="configs/digits16_t2i.yml", prompt=prompt)
    with guide:
        out = pipe([prompt] * 6, height=16, width=16, guidance_scale=3.0, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    api = to_uint8(out.float() * 2 - 1)
    cli = np.stack([read_png(tmp_path / "cli" / f"{s:06d}.png") for s in seeds])
    assert np.array_equal(api.reshape(cli.shape), cli)
    rec = json.loads((tmp_path / "cli" / "run.json").read_text())
    cli_estimate = rec["adp_distribution_last_step"][0]["adp_distribution"]
    api_estimate = guide.report()["batches"][0]["estimate"]
    assert set(api_estimate) == set(cli_estimate)
    for key, value in cli_estimate.items():
        assert api_estimate[key] == pytest.approx(value, abs=1e-6), key
    assert guide.report()["settings"] == rec["resolved"]["guidance"]["settings"]


def test_the_hook_is_removed_after_an_exception_and_bad_input_is_named(monkeypatch):
    monkeypatch.chdir(ROOT)
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("pretrained/digits16_t2i")
    pipe.set_progress_bar_config(disable=True)
    guide = diffusion_latent.balance(pipe, "pretrained/digits16_t2i_adp.pt", {"parity": 0.5})
    with pytest.raises(ValueError, match="stop"):
        with guide:
            pipe(["a digit"] * 2, height=16, width=16, num_inference_steps=2, callback_on_step_end=_boom)
    assert not pipe.unet.mid_block._forward_hooks and not pipe.unet._forward_pre_hooks
    assert "set_timesteps" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match="not a pipeline of a supported family"):
        diffusion_latent.balance(object(), "pretrained/digits16_t2i_adp.pt", {"parity": 0.5})
    with pytest.raises(ValueError, match="give a dict"):
        diffusion_latent.balance(pipe, "pretrained/digits16_t2i_adp.pt", 0.5)


def _boom(pipe, i, t, kwargs):
    raise ValueError("stop")


def test_each_pipeline_call_is_one_batch_also_when_the_scheduler_repeats_a_timestep(monkeypatch):
    # PNDM (SD 1.5's own scheduler) repeats its second timestep: calls are told apart by
    # set_timesteps, not by the timestep values
    monkeypatch.chdir(ROOT)
    from diffusers import DiffusionPipeline, PNDMScheduler
    pipe = DiffusionPipeline.from_pretrained("pretrained/digits16_t2i")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.scheduler.set_timesteps(5)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    assert len(ts) == 6 and len(set(ts)) == 5                  # the repeat this test is about
    guide = diffusion_latent.balance(pipe, "pretrained/digits16_t2i_adp.pt", {"parity": 0.5},
                                     config="configs/digits16_t2i.yml")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    with guide:
        for n in (4, 3):
            pipe(["a digit"] * n, height=16, width=16, num_inference_steps=5, guidance_scale=3.0,
                 generator=[torch.Generator().manual_seed(s) for s in range(n)])
    batches = guide.report()["batches"]
    assert [b["images"] for b in batches] == [4, 3]
    assert len(calls) == 12 and all(0 < b["guided_steps"] <= 6 for b in batches)
    assert all(set(b["estimate"]) for b in batches)
