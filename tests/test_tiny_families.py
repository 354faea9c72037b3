"""The tiny random pipelines of models.tiny_families (saved, reloaded offline, generating), and the
published denoisers' architectures on the meta device."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from models.tiny_families import (  # noqa: E402
    CALL_KWARGS, DENOISER, FAMILIES, PIPELINE_CLASS, PUBLISHED, TINY_RESOLUTION, check_family, h_module_name,
    h_width, meta_denoiser, meta_h_shape, published_token_grid, published_width, save_tiny, token_grid)

PROMPT = "a photo of a Doctor, smiling."
#: published denoiser sizes (billions of parameters) the PUBLISHED configs must reproduce
PUBLISHED_BILLIONS = {"sd": 0.86, "sdxl": 2.57, "sd3": 8.06, "flux": 11.90, "pixart_sigma": 0.61, "sana": 1.60}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, saved folder, pipeline loaded back offline)."""
    from diffusers import DiffusionPipeline
    family = request.param
    folder = save_tiny(family, tmp_path_factory.mktemp(family) / "tiny")
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return family, folder, pipe


def generate(family, pipe, seeds, steps=2):
    size = TINY_RESOLUTION[family]
    return pipe(prompt=[PROMPT] * len(seeds), num_inference_steps=steps, height=size, width=size,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pt",
                **CALL_KWARGS[family]).images


def test_saved_pipeline_class(tiny):
    family, folder, pipe = tiny
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASS[family]
    assert type(pipe).__name__ == PIPELINE_CLASS[family]


def test_generation_deterministic_and_per_seed(tiny):
    family, _, pipe = tiny
    pair, again, single = generate(family, pipe, [3, 4]), generate(family, pipe, [3, 4]), generate(family, pipe, [3])
    size = TINY_RESOLUTION[family]
    assert pair.shape == (2, 3, size, size) and torch.isfinite(pair).all()
    assert torch.equal(pair, again)
    torch.testing.assert_close(single[0], pair[0], atol=1e-5, rtol=0)
    assert (pair[0] - pair[1]).abs().max() > 1e-2


def test_tiny_denoiser_is_tiny(tiny):
    family, _, pipe = tiny
    params = sum(p.numel() for p in getattr(pipe, DENOISER[family]).parameters())
    assert params < (1_000_000 if family == "sd" else 400_000)   # "sd": models.sd_tiny's U-Net


def test_tiny_h_shape_matches_the_grid(tiny):
    """The h module's output in a real call: [B, C, gh, gw] (U-Net mid-block) or the image tokens
    [B, gh * gw, D], second of a transformer block's (encoder_hidden_states, hidden_states)."""
    family, _, pipe = tiny
    net, seen = getattr(pipe, DENOISER[family]), []
    grab = lambda _m, _a, out: seen.append(out)  # noqa: E731
    with net.get_submodule(h_module_name(family)).register_forward_hook(grab):
        generate(family, pipe, [0], steps=1)
    cfg = dict(net.config)
    gh, gw = token_grid(family, cfg, TINY_RESOLUTION[family], pipe.vae_scale_factor)
    out = seen[0]
    if DENOISER[family] == "unet":
        assert out.shape[1:] == (h_width(family, cfg), gh, gw)
    elif family in ("sd3", "flux"):
        text, image = out
        assert image.shape[1:] == (gh * gw, h_width(family, cfg)) and text.shape[-1] == image.shape[-1]
    else:
        assert out.shape[1:] == (gh * gw, h_width(family, cfg))


@pytest.mark.parametrize("family", FAMILIES)
def test_published_denoiser_on_meta(family):
    net = meta_denoiser(family)
    assert type(net).__name__ == PUBLISHED[family]["denoiser_class"]
    assert all(p.is_meta for p in net.parameters())
    billions = sum(p.numel() for p in net.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED_BILLIONS[family], rel=0.01)
    gh, gw = published_token_grid(family)
    width, shape = published_width(family), meta_h_shape(family, batch=2)
    assert shape == ((2, width, gh, gw) if DENOISER[family] == "unet" else (2, gh * gw, width))


def test_published_facts():
    assert published_token_grid("sd") == (8, 8) and published_width("sd") == 1280
    assert published_token_grid("flux") == (64, 64) and published_width("flux") == 3072
    assert published_token_grid("sana") == (32, 32) and published_width("sana") == 2240


def test_unknown_family_says_what_to_use():
    with pytest.raises(ValueError, match="use one of sd, sdxl"):
        check_family("kandinsky")
    with pytest.raises(ValueError, match="unknown diffusers family"):
        save_tiny("sd4", "unused")
