"""diffusers UNet2DModel wrapper: h-space through the hook in diffusers' own forward, strict loading
from a local model folder (never the Hub), clear errors, the published config."""
from __future__ import annotations

import json

import pytest
import torch

from models.adm_unet import ADMConfig, ADMUNet
from models.diffusers_unet import DiffusersUNet, read_diffusers_folder
from models.loader import CheckpointError, build_model, load_model
from utils.app.config import load_config

TOL = 1e-5
# google/ddpm-celebahq-256's layout, shrunk: 16 px, two levels, attention on the second one
TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[32, 64],
            layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"], freq_shift=1, flip_sin_to_cos=False,
            downsample_padding=0, attention_head_dim=None, norm_eps=1e-6)
# the score-SDE style blocks: skip branches, Fourier (sigma) time embedding, centred input
SKIP_FOURIER = dict(sample_size=16, block_out_channels=[32, 64], layers_per_block=1,
                    down_block_types=["SkipDownBlock2D", "AttnSkipDownBlock2D"],
                    up_block_types=["AttnSkipUpBlock2D", "SkipUpBlock2D"],
                    time_embedding_type="fourier", attention_head_dim=None,
                    norm_num_groups=None, center_input_sample=True)


def _unet(seed: int = 0, **kwargs):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(**kwargs).eval()


def _inputs(fourier: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    return x, (torch.tensor([0.3, 25.0]) if fourier else torch.tensor([5, 871]))


@pytest.mark.parametrize("kwargs", [TINY, SKIP_FOURIER], ids=["ddpm_layout", "skip_fourier"])
def test_hook_reads_and_replaces_mid_block_in_the_stock_forward(kwargs):
    unet = _unet(**kwargs)
    net = DiffusersUNet(unet).eval()
    x, t = _inputs(kwargs.get("time_embedding_type") == "fourier")
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        reference = unet(x, t).sample
        eps, h, eps_h = net.predict(x, t)
    handle.remove()
    assert tuple(h.shape[1:]) == net.h_shape == (64, 8, 8)
    assert torch.equal(h, seen[0]) and torch.equal(eps, reference) and eps_h is None
    # an edit replaces mid_block's output: the rest of the stock forward runs from the new h
    shifted = lambda h: h + 0.25                                          # noqa: E731
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: out + 0.25)
    with torch.no_grad():
        expect = unet(x, t).sample
        handle.remove()
        eps, h2, eps_h = net.predict(x, t, shifted, unedited=True)
    assert torch.equal(eps, expect) and torch.equal(h2, h) and torch.equal(eps_h, reference)
    assert not torch.equal(eps, reference)


def test_sampled_images_are_those_of_the_split_forward_it_replaced():
    """DDIM images (vanilla, h shifted, asymmetric) of a seeded tiny UNet2DModel: the values the
    earlier re-implemented encoder/decoder split gave, to float precision (it and the hook gave
    bit-identical x0 when the hook replaced it)."""
    from utils.sampling.diffusion import DDIMSampler, Schedule
    net = DiffusersUNet(_unet(0, **TINY)).eval()
    sampler = DDIMSampler(net, Schedule.from_config({}), 20, eta=0.0, skip_type="uniform")
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    shift = lambda h, step: h + 0.5                                     # noqa: E731
    golden = {"vanilla": (-31097.371226785704, [-192.063720703125, 15.219230651855469, 166.8333282470703]),
              "edited": (-31047.768602266908, [-187.9453887939453, 24.571996688842773, 172.2445068359375]),
              "asym": (-30963.080553896725, [-181.87721252441406, 39.169525146484375, 180.76734924316406])}
    runs = {"vanilla": {}, "edited": {"edit_h": shift}, "asym": {"edit_h": shift, "asymmetric": True}}
    for name, kwargs in runs.items():
        x0, _ = sampler.sample(x_T, **kwargs)
        total, first = golden[name]
        assert x0.double().sum().item() == pytest.approx(total, rel=1e-6), name
        assert x0[0, 0, 0, :3].tolist() == pytest.approx(first, rel=1e-5), name


def test_scalar_timestep_is_broadcast():
    net = DiffusersUNet(_unet(**TINY)).eval()
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor(9)), net(x, torch.tensor([9, 9])))


@pytest.mark.parametrize("by", ["folder", "kwargs"])
def test_strict_round_trip_through_loader(tmp_path, by):
    from diffusers import UNet2DModel
    unet = _unet(seed=1, **TINY)
    folder = tmp_path / "tiny-unet"
    unet.save_pretrained(folder)
    arch = {"folder": str(folder)} if by == "folder" else dict(TINY)
    net = load_model({"family": "diffusers", "checkpoint": str(folder), "h_shape": [64, 8, 8],
                      **arch}, "tiny")
    ref = UNet2DModel.from_pretrained(folder).eval()
    x, t = _inputs()
    with torch.no_grad():
        assert (net(x, t) - ref(x, t).sample).abs().max().item() < TOL
        assert torch.equal(net(x, t), DiffusersUNet(unet).eval()(x, t))


def test_pipeline_layout_and_bin_weights_with_old_attention_names(tmp_path):
    """A saved pipeline keeps the UNet in unet/; diffusers < 0.15 named attention query/key/
    value/proj_attn. Both load strictly."""
    unet = _unet(seed=2, **TINY)
    folder = tmp_path / "pipeline" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(unet.config)))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in unet.state_dict().items():
        for new, dep in old.items():
            k = k.replace(f".{new}.", f".{dep}.")
        sd[k] = v
    assert any(".query." in k for k in sd)
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    root = tmp_path / "pipeline"
    net = load_model({"family": "diffusers", "checkpoint": str(root), "folder": str(root)}, "old")
    x, t = _inputs()
    with torch.no_grad():
        assert (net(x, t) - unet(x, t).sample).abs().max().item() < TOL


def test_read_folder_keys_match_wrapper(tmp_path):
    unet = _unet(**TINY)
    unet.save_pretrained(tmp_path)
    assert set(read_diffusers_folder(tmp_path)) == set(DiffusersUNet(unet).state_dict())


def _save_as_diffusers_folder(folder, state_dict, config: dict):
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
    save_file({k: v.contiguous() for k, v in state_dict.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))


def test_other_family_checkpoint_names_the_keys(tmp_path):
    adm = ADMUNet(ADMConfig(image_size=16, model_channels=32, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(8,)))
    folder = tmp_path / "adm"
    _save_as_diffusers_folder(folder, adm.state_dict(), TINY)
    with pytest.raises(CheckpointError, match=r"missing key.*unet\.conv_in\.weight") as err:
        load_model({"family": "diffusers", "checkpoint": str(folder), **TINY}, "tiny")
    assert "unexpected key(s) (first: ['unet.input_blocks." in str(err.value)


def test_other_size_checkpoint_names_the_layer(tmp_path):
    wide = dict(TINY, block_out_channels=[32, 96])
    folder = tmp_path / "wide"
    _unet(**wide).save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"layer unet\.\S+ has shape"):
        load_model({"family": "diffusers", "checkpoint": str(folder), **TINY}, "tiny")


@pytest.mark.parametrize("arch, message", [
    (dict(TINY, num_class_embeds=10), "class-conditional"),
    (dict(TINY, mid_block_type=None), "no mid block"),
    (dict(TINY, block_out_chanels=[32, 64]), "unknown key"),
    (dict(TINY, h_shape=[64, 4, 4]), "h_shape"),
    ({}, "folder"),
    (dict(folder="/nonexistent/unet"), "not a diffusers model folder"),
    (dict(TINY, folder="/nonexistent/unet"), "either folder"),
])
def test_bad_configs_fail_clearly(arch, message):
    with pytest.raises(ValueError, match=message):
        build_model({"family": "diffusers", **arch}, "bad")


def test_published_config_architecture(capsys):
    cfg = load_config("configs/celeba_hq_diffusers.yml")
    with torch.device("meta"):
        net = build_model(cfg["model"], "celeba_hq_diffusers")
    assert net.h_shape == tuple(cfg["model"]["h_shape"]) == (512, 8, 8)
    n_params = sum(p.numel() for p in net.parameters())
    with capsys.disabled():
        print(f"\nceleba_hq_diffusers: h_shape {net.h_shape}, {n_params:,} parameters")
    assert 100e6 < n_params < 130e6
    # the same network as the ermongroup-layout CelebA-HQ DDPM
    with torch.device("meta"):
        ddpm = build_model(load_config("configs/celeba_hq_ddpm.yml")["model"], "celeba_hq_ddpm")
    assert n_params == sum(p.numel() for p in ddpm.parameters())


def test_image_shape_comes_from_the_diffusers_config():
    from diffusers import UNet2DModel
    from models.diffusers_unet import DiffusersUNet
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                       norm_num_groups=8)
    assert DiffusersUNet(unet).image_shape == (1, 16, 16)
