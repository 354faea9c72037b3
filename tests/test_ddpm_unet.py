"""DDPM (ermongroup/ddim layout) U-Net: h-space split, strict loading, published configs.

The numerical reference is diffusers' ``UNet2DModel``, an independent implementation of the same
Ho et al. network (google/ddpm-* are conversions of it): a tiny random diffusers model is mapped
onto the ermongroup parameter names and both must give the same eps.
"""
from __future__ import annotations

import re

import pytest
import torch

from models.adm_unet import ADMConfig, ADMUNet
from models.ddpm_unet import DDPMUNet
from models.loader import CheckpointError, build_model, load_model
from utils.app.config import load_config

TINY = dict(family="ddpm", image_size=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[8], dropout=0.0, resamp_with_conv=True,
            var_type="fixedsmall", h_shape=[64, 8, 8])
PUBLISHED = ["celeba_hq_ddpm", "lsun_church_ddpm", "lsun_bedroom_ddpm"]


def _inputs(n: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([7, 913][:n])


def _tiny(seed: int = 0, **over) -> DDPMUNet:
    torch.manual_seed(seed)
    return build_model({**TINY, **over}, "tiny").eval()


def test_h_shape_and_split_equals_forward():
    net = _tiny()
    x, t = _inputs()
    with torch.no_grad():
        h, ctx = net.encode(x, t)
        assert tuple(h.shape[1:]) == net.h_shape == (64, 8, 8)
        assert torch.equal(net.decode(h, ctx), net(x, t))
        assert net(x, t).shape == x.shape


def test_parameter_names_follow_ermongroup():
    keys = set(_tiny(num_res_blocks=2).state_dict())
    for k in ["temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight",
              "down.0.block.1.conv2.weight", "down.0.downsample.conv.weight",
              "down.1.block.0.nin_shortcut.weight", "down.1.attn.1.proj_out.weight",
              "mid.block_1.temb_proj.weight", "mid.attn_1.q.weight", "mid.block_2.norm2.bias",
              "up.1.block.2.conv1.weight", "up.1.attn.2.k.weight", "up.1.upsample.conv.weight",
              "up.0.block.0.nin_shortcut.weight", "norm_out.weight", "conv_out.bias"]:
        assert k in keys, k
    assert not any(k.startswith("up.0.upsample") or k.startswith("down.1.downsample")
                   for k in keys)
    assert _tiny().state_dict()["mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


def test_avgpool_resampling_has_no_resample_convs():
    net = _tiny(resamp_with_conv=False)
    assert not any("sample.conv" in k for k in net.state_dict())
    x, t = _inputs()
    assert net(x, t).shape == x.shape


@pytest.mark.parametrize("wrap", ["plain", "ermongroup_list_with_module_prefix"])
def test_strict_round_trip_through_loader(tmp_path, wrap):
    net = _tiny(seed=1)
    sd = net.state_dict()
    if wrap != "plain":          # ermongroup saves [model.state_dict(), optimizer, ...] of a DataParallel
        sd = [{f"module.{k}": v for k, v in sd.items()}, {"optimizer": 0}]
    path = tmp_path / "tiny.ckpt"
    torch.save(sd, path)
    loaded = load_model({**TINY, "checkpoint": str(path)}, "tiny")
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))


def test_other_family_checkpoint_names_the_keys(tmp_path):
    adm = ADMUNet(ADMConfig(image_size=16, model_channels=32, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(8,)))
    path = tmp_path / "adm.pt"
    torch.save(adm.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing key.*temb\.dense\.0\.weight") as err:
        load_model({**TINY, "checkpoint": str(path)}, "tiny")
    assert "unexpected" in str(err.value) and "time_embed.0.weight" in str(err.value)


def test_other_size_checkpoint_names_the_layer(tmp_path):
    path = tmp_path / "wide.ckpt"
    torch.save(_tiny(ch=64, h_shape=[128, 8, 8]).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"layer temb\.dense\.0\.weight has shape"):
        load_model({**TINY, "checkpoint": str(path)}, "tiny")


@pytest.mark.parametrize("bad, message", [
    (dict(h_shape=[64, 4, 4]), "h_shape"),
    (dict(var_type="learned"), "var_type"),
    (dict(image_size=17), "divisible"),
    (dict(ema_rate=0.999), "unknown key"),
])
def test_bad_configs_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        build_model({**TINY, **bad}, "tiny")


# ---- numerical reference: diffusers' UNet2DModel in the DDPM configuration -------------------

def _diffusers_to_ermongroup(name: str, n_levels: int) -> str:
    """Map a diffusers UNet2DModel parameter name onto the ermongroup/ddim name."""
    rules = [
        (r"^time_embedding\.linear_1\.", "temb.dense.0."),
        (r"^time_embedding\.linear_2\.", "temb.dense.1."),
        (r"^conv_norm_out\.", "norm_out."),
        (r"^mid_block\.resnets\.0\.", "mid.block_1."), (r"^mid_block\.resnets\.1\.", "mid.block_2."),
        (r"^mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"^up_blocks\.(\d+)\.resnets\.", r"up.\1.block."),
        (r"^up_blocks\.(\d+)\.attentions\.", r"up.\1.attn."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.upsample."),
        (r"\.time_emb_proj\.", ".temb_proj."), (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.group_norm\.", ".norm."), (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."),
        (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".proj_out."),
    ]
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    m = re.match(r"^up\.(\d+)\.", name)          # diffusers counts decoder levels from the bottom
    if m:
        name = f"up.{n_levels - 1 - int(m.group(1))}." + name[m.end():]
    return name


def test_matches_diffusers_implementation_of_the_same_network():
    from diffusers import UNet2DModel
    torch.manual_seed(3)
    ref = UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), freq_shift=1,
                      flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6,
                      attention_head_dim=None, act_fn="silu").eval()
    net = _tiny(num_res_blocks=2)
    own = net.state_dict()
    sd = {}
    for k, v in ref.state_dict().items():
        name = _diffusers_to_ermongroup(k, 2)
        sd[name] = v.reshape(own[name].shape)       # attention Linear -> 1x1 Conv2d
    net.load_state_dict(sd, strict=True)
    x, t = _inputs()
    with torch.no_grad():
        diff = (net(x, t) - ref(x, t).sample).abs().max().item()
    assert diff < 1e-5, diff


# ---- the published checkpoints' configs -------------------------------------------------------

@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_architecture(name, capsys):
    cfg = load_config(f"configs/{name}.yml")
    with torch.device("meta"):
        net = build_model(cfg["model"], name)
    assert net.h_shape == tuple(cfg["model"]["h_shape"]) == (512, 8, 8)
    n_params = sum(p.numel() for p in net.parameters())
    with capsys.disabled():
        print(f"\n{name}: h_shape {net.h_shape}, {n_params:,} parameters")
    assert 100e6 < n_params < 130e6
    assert cfg["diffusion"]["num_diffusion_timesteps"] == 1000 and cfg["source"]


# ---- optional parity with ermongroup/ddim's own code (never vendored) -------------------------
# DDIM_PATH=/path/to/ddim-checkout pytest tests/test_ddpm_unet.py   (needs models/diffusion.py)

def _ermongroup_model_class():
    """ermongroup/ddim's ``Model``, or skip when no checkout is given."""
    import importlib.util
    import os
    from pathlib import Path
    path = os.environ.get("DDIM_PATH")
    if not path:
        pytest.skip("set DDIM_PATH to a checkout of ermongroup/ddim to run the parity tests")
    file = Path(path).expanduser() / "models" / "diffusion.py"
    if not file.is_file():
        pytest.skip(f"DDIM_PATH={path} has no models/diffusion.py")
    spec = importlib.util.spec_from_file_location("ermongroup_ddim_diffusion", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


def _ermongroup_config(model: dict):
    """The nested namespace ermongroup's ``Model`` reads (config.model / data / diffusion)."""
    from types import SimpleNamespace as NS
    arch = {k: v for k, v in model.items() if k not in ("family", "checkpoint", "h_shape")}
    size = arch.pop("image_size")
    return NS(model=NS(type="simple", **arch), data=NS(image_size=size),
              diffusion=NS(num_diffusion_timesteps=1000))


@pytest.mark.parametrize("name", PUBLISHED)
def test_reference_state_dict_layout(name):
    model_cls = _ermongroup_model_class()
    cfg = load_config(f"configs/{name}.yml")["model"]
    with torch.device("meta"):
        ref, net = model_cls(_ermongroup_config(cfg)), build_model(cfg, name)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("over", [
    {}, dict(num_res_blocks=2, ch_mult=[1, 2, 2], attn_resolutions=[16, 4], h_shape=[64, 4, 4]),
    dict(resamp_with_conv=False, attn_resolutions=[])])
def test_reference_numerical_parity(over):
    model_cls = _ermongroup_model_class()
    cfg = {**TINY, **over}
    net = _tiny(seed=5, **over)
    ref = model_cls(_ermongroup_config(cfg)).eval()
    ref.load_state_dict(net.state_dict(), strict=True)
    x, t = _inputs()
    with torch.no_grad():
        diff = (net(x, t) - ref(x, t.float())).abs().max().item()
    assert diff < 1e-5, diff


def test_published_diffusers_celeba_is_the_same_network():
    """google/ddpm-celebahq-256's parameters map one-to-one (same shapes) onto celeba_hq.ckpt's."""
    cfgs = {n: load_config(f"configs/{n}.yml")["model"]
            for n in ("celeba_hq_ddpm", "celeba_hq_diffusers")}
    with torch.device("meta"):
        ddpm = build_model(cfgs["celeba_hq_ddpm"], "celeba_hq_ddpm")
        unet = build_model(cfgs["celeba_hq_diffusers"], "celeba_hq_diffusers").unet
    ours = {k: v.numel() for k, v in ddpm.state_dict().items()}
    mapped = {_diffusers_to_ermongroup(k, 6): v.numel() for k, v in unet.state_dict().items()}
    assert mapped == ours
