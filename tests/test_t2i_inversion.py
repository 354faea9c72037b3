"""h from labelled image folders for text-to-image: VAE encoding and DDIM inversion under a prompt
(utils.sampling.text2image.invert), and the command line's --just_precompute on an sd config:
extract -> train -> a balanced run, resumable."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import main as entry  # noqa: E402
from models.hspace import HSpaceHook  # noqa: E402
from models.sd_tiny import save_tiny_sd  # noqa: E402
from utils.app.config import load_config  # noqa: E402
from utils.sampling.text2image import invert, load_t2i  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_inversion_reconstructs_the_latent_on_the_trained_text_conditional_default(monkeypatch):
    """Invert 3 generated digits (50 DDIM steps, "a digit", no CFG) and sample back from the
    inverted latent with the stock pipeline: the VAE latent within 5% (relative L2; 0.020 measured)."""
    monkeypatch.chdir(ROOT)
    pipe = load_t2i(load_config("configs/digits16_t2i.yml"), torch.device("cpu"), cfg_scale=1.0).with_prompt("a digit")
    x = pipe.draw([1, 2, 3]).clamp(-1, 1)
    z_T, hs = invert(pipe, x, "a digit")
    z0 = pipe.pipe.vae.encode(x).latent_dist.mean * pipe.pipe.vae.config.scaling_factor
    back = pipe.pipe(prompt=["a digit"] * 3, latents=z_T, num_inference_steps=50, guidance_scale=1.0,
                     output_type="latent").images
    assert float((back - z0).norm() / z0.norm()) < 0.05, float((back - z0).norm() / z0.norm())
    assert tuple(hs.shape) == (3, 50, *pipe.h_shape)
    record = []                                   # the h of step 0 is the denoiser's at the inverted latent
    with HSpaceHook(pipe.denoiser, lambda h, step: record.append(h.half()), **pipe.hspec.hook_kwargs()):
        pipe.pipe(prompt=["a digit"] * 3, latents=z_T, num_inference_steps=1, guidance_scale=1.0,
                  output_type="latent")
    assert torch.allclose(record[0].float(), hs[:, 0].float(), atol=2e-3)


def _write_class_folders(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(["female", "male"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            base = 60 + 120 * k                                   # the classes differ in brightness
            img = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_labelled_folders_extract_train_and_balance_from_the_command_line(capsys, tmp_path):
    import multi_classifier
    sd = save_tiny_sd(tmp_path / "sd")
    cfg = {"name": "tiny_sd", "model": {"family": "sd", "checkpoint": str(sd)},
           "sampling": {"steps": 5, "eta": 0.0, "cfg": 7.5}, "guidance": {"preset": "ours"}}
    cfg_path = tmp_path / "tiny.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    images, h_dir = _write_class_folders(tmp_path / "faces"), tmp_path / "h"
    argv = ["--config", cfg_path, "--just_precompute", "True", "--test_path_one", images, "--attribute", "gender",
            "--bs_test", 4, "--savepath", h_dir]
    assert entry.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    meta = json.loads((h_dir / "meta.json").read_text())
    assert meta["source"] == "folders" and meta["attributes"] == {"gender": ["female", "male"]} and meta["n"] == 8
    assert meta["text"]["inversion_prompt"] == "" and meta["h_shape"] == [64, 4, 4]
    shard = torch.load(h_dir / "shard_00001.pt", weights_only=True)
    assert tuple(shard["h"].shape) == (4, 5, 64, 4, 4) and shard["labels"]["gender"].tolist() == [1, 1, 1, 1]
    stamp = (h_dir / "shard_00000.pt").stat().st_mtime_ns
    assert entry.main([str(a) for a in argv]) == 0                        # resumed: nothing redone
    assert (h_dir / "shard_00000.pt").stat().st_mtime_ns == stamp
    adp = tmp_path / "adp.pt"
    assert multi_classifier.main(["--data", str(h_dir), "--attributes", "gender", "--out", str(adp),
                                  "--epochs", "2", "--val_fraction", "0.25"]) == 0
    out = tmp_path / "run"
    rc = entry.main([str(a) for a in ["--config", cfg_path, "--adp", adp, "--prompt", "a photo", "--mode",
                                      "distribution", "--target", "gender=0.5", "--n_test_img", 4, "--bs_test", 2,
                                      "--no-check", "--exp", out]])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
