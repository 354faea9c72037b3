"""Numerical parity of ``models.adm_unet.ADMUNet`` with openai/guided-diffusion's ``UNetModel``.

The reference is never vendored (this is a clean-room implementation). To run these tests, put a
copy of guided-diffusion's ``guided_diffusion`` package (``unet.py``, ``nn.py``, ``fp16_util.py``,
``logger.py``, ``__init__.py``) in a folder outside the repository and point to it:

    GUIDED_DIFFUSION_PATH=/tmp/gdref pytest tests/test_adm_reference.py

(``/tmp/gdref/guided_diffusion/unet.py`` must exist; the env var may also name the
``guided_diffusion`` folder itself.) An installed ``guided_diffusion`` package works too. Without
either, every test here is skipped.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from models.adm_unet import ADMConfig, ADMUNet
from models.loader import load_state_dict_strict

TOL = 1e-5


def _reference_unet_class():
    """guided-diffusion's ``UNetModel``, or skip with the reason it is unavailable."""
    path = os.environ.get("GUIDED_DIFFUSION_PATH")
    if path:
        p = Path(path).expanduser().resolve()
        root = p.parent if (p / "unet.py").exists() and p.name == "guided_diffusion" else p
        if not (root / "guided_diffusion" / "unet.py").exists():
            pytest.skip(f"GUIDED_DIFFUSION_PATH={path} has no guided_diffusion/unet.py")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        return importlib.import_module("guided_diffusion.unet").UNetModel
    except ImportError as e:
        pytest.skip("openai/guided-diffusion reference not available (set GUIDED_DIFFUSION_PATH "
                    f"to a folder holding guided_diffusion/unet.py): {e}")


# Small configs that together cover every architecture switch ADMConfig has.
CASES = {
    "scaleshift_updown_headch_legacy_sigma": dict(
        image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(16, 8), num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False, learn_sigma=True),
    "add_conv_resample_heads_neworder": dict(
        image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions=(8,), num_heads=2, use_scale_shift_norm=False,
        resblock_updown=False, conv_resample=True, use_new_attention_order=True,
        learn_sigma=False),
    "pool_nearest_no_conv_resample": dict(
        image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
        attention_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True,
        resblock_updown=False, conv_resample=False, use_new_attention_order=False,
        learn_sigma=True),
    "halfmult_updown_neworder_headch_grey": dict(
        image_size=16, in_channels=1, out_channels=1, model_channels=64,
        channel_mult=(0.5, 1, 2), num_res_blocks=1, attention_resolutions=(4,),
        num_head_channels=32, use_scale_shift_norm=False, resblock_updown=True,
        use_new_attention_order=True, learn_sigma=True),
}


def _reference_model(UNetModel, cfg: ADMConfig):
    """Build guided-diffusion's UNetModel the way its script_util.create_model does."""
    return UNetModel(
        image_size=cfg.image_size, in_channels=cfg.in_channels,
        model_channels=cfg.model_channels,
        out_channels=cfg.out_channels * (2 if cfg.learn_sigma else 1),
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
        dropout=cfg.dropout, channel_mult=cfg.resolved_channel_mult(),
        conv_resample=cfg.conv_resample, num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_guided_diffusion(name):
    UNetModel = _reference_unet_class()
    cfg = ADMConfig(**CASES[name])
    torch.manual_seed(0)
    ref = _reference_model(UNetModel, cfg).eval()
    # guided-diffusion zero-initialises its output convs; randomise everything so that every
    # layer (attention projections, norms, out conv) influences the output.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = ADMUNet(cfg).eval()
    # the reference's own state_dict loads with strict=True (same names, same shapes)
    load_state_dict_strict(ours, ref.state_dict(), name, "<guided-diffusion state_dict>")

    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([3, 871])
    with torch.no_grad():
        want = ref(x, t)
        got_raw = ours.forward_raw(x, t)
        got_eps = ours(x, t)
    diff = (want - got_raw).abs().max().item()
    print(f"{name}: max |ours - guided-diffusion| = {diff:.3e}")
    assert got_raw.shape == want.shape
    assert diff < TOL
    assert torch.equal(got_eps, got_raw[:, :cfg.out_channels] if cfg.learn_sigma else got_raw)
    assert ours.h_shape == tuple(ours.encode(x, t)[0].shape[1:])
