"""utils/data/extract.py: pseudo-labelled and folder (DDIM-inversion) extraction, resume, errors, loading.

CPU only: a tiny random 16x16 ADM U-Net, 5 DDIM steps, batches of 2 and a stub labeller.
"""
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from utils.sampling.diffusion import DDIMSampler, Schedule, ddim_step
from utils.data.extract import extract_from_folders, extract_pseudo_labelled, load_h_dataset, read_meta
from utils.sampling.seeds import SeededNoise

SHAPE = (1, 16, 16)
META = {"model": {"config": "tiny", "checkpoint_sha256": "0" * 64}, "config": "tiny"}


class BrightnessLabeller:
    """Stub judge: 'bright' from the mean pixel value, 'contrast' from the pixel std."""
    attributes = {"bright": ["dark", "bright"], "contrast": ["flat", "contrasty"]}

    def predict(self, images):
        m = images.mean(dim=(1, 2, 3))
        p1 = torch.sigmoid(20 * m)
        q1 = torch.sigmoid(20 * (images.std(dim=(1, 2, 3)) - 0.5))
        return {"bright": torch.stack([1 - p1, p1], 1), "contrast": torch.stack([1 - q1, q1], 1)}


@pytest.fixture(scope="module")
def net(tiny_adm):
    return tiny_adm


@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_config({"beta_schedule": "linear", "num_diffusion_timesteps": 1000})


@pytest.fixture
def sampler(net, schedule):
    return DDIMSampler(net, schedule, num_steps=5, eta=1.0)


def _shard(folder, k):
    return torch.load(folder / f"shard_{k:05d}.pt", weights_only=True)


@torch.no_grad()
def _reference_path(net, sched, timesteps, seeds, eta):
    """The sampling path written out step by step: (x0, h [N,S,C,H,W]) from net.encode."""
    noise = SeededNoise(seeds, SHAPE)
    x, hs = noise.x_T(), []
    for i, t in enumerate(timesteps):
        tt = torch.full((len(seeds),), t)
        h, ctx = net.encode(x, tt)
        hs.append(h)
        eps = net.decode(h, ctx)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_prev = sched.alpha_bar(t), sched.alpha_bar(t_prev)
        z = noise.step(i) if a_prev < 1 else None
        x, _ = ddim_step(eps, x, a_t, a_prev, eta if a_prev < 1 else 0.0, z)
    return x, torch.stack(hs, 1)


def test_pseudo_shards_hold_h_along_the_sampling_path(net, schedule, sampler, tmp_path):
    out = tmp_path / "pseudo"
    seeds = [11, 12, 13]
    extract_pseudo_labelled(sampler, seeds, BrightnessLabeller(), out, META, batch_size=2)
    meta = read_meta(out)
    assert meta["timesteps"] == sampler.timesteps and meta["h_shape"] == list(net.h_shape)
    assert meta["source"] == "pseudo" and meta["n"] == 3
    assert meta["attributes"] == BrightnessLabeller.attributes
    shards = [_shard(out, 0), _shard(out, 1)]
    assert not (out / "shard_00002.pt").exists()
    assert [s["ids"] for s in shards] == [[11, 12], [13]]
    for sh, batch in zip(shards, ([11, 12], [13])):
        assert sh["h"].dtype == torch.float16
        assert tuple(sh["h"].shape) == (len(batch), 5, *net.h_shape)
        x0, h_ref = _reference_path(net, schedule, sampler.timesteps, batch, sampler.eta)
        torch.testing.assert_close(sh["h"].float(), h_ref, rtol=2e-3, atol=2e-3)
        probs = BrightnessLabeller().predict(x0.clamp(-1, 1))
        for a in BrightnessLabeller.attributes:
            assert torch.equal(sh["labels"][a], probs[a].argmax(1))
            assert sh["labels"][a].dtype == torch.int64
            torch.testing.assert_close(sh["probs"][a], probs[a], rtol=1e-4, atol=1e-5)


def test_pseudo_resume_redoes_only_the_missing_shard(sampler, tmp_path, monkeypatch):
    out = tmp_path / "pseudo"
    seeds = list(range(6))
    extract_pseudo_labelled(sampler, seeds, BrightnessLabeller(), out, META, batch_size=2)
    files = [out / f"shard_{k:05d}.pt" for k in range(3)]
    assert all(f.exists() for f in files)
    before = {k: os.stat(files[k]).st_mtime_ns for k in (0, 2)}
    original = _shard(out, 1)
    files[1].unlink()

    calls = []
    real_sample = DDIMSampler.sample

    def counting_sample(self, *a, **kw):
        calls.append(1)
        return real_sample(self, *a, **kw)

    monkeypatch.setattr(DDIMSampler, "sample", counting_sample)
    extract_pseudo_labelled(sampler, seeds, BrightnessLabeller(), out, META, batch_size=2)
    assert len(calls) == 1
    assert {k: os.stat(files[k]).st_mtime_ns for k in (0, 2)} == before
    redone = _shard(out, 1)
    assert redone["ids"] == [2, 3]
    assert torch.equal(redone["h"], original["h"])          # a seed per sample: same result
    assert not list(out.glob(".*.tmp"))


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((16, 16), value, np.uint8)
    arr[4:8, 4:8] = 255 - value
    Image.fromarray(arr, mode="L").save(path)


def _class_folders(root):
    for name, values in {"zebra": [10, 40, 70], "apple": [200, 230]}.items():
        for j, v in enumerate(values):
            _png(root / name / f"img{j}.png", v)
    return root


def test_folders_labels_follow_folder_order_and_h_matches_inversion(net, schedule, sampler, tmp_path):
    root = _class_folders(tmp_path / "data")
    out = tmp_path / "h"
    extract_from_folders(sampler, root, "animal", out, META, batch_size=4)
    meta = read_meta(out)
    assert meta["attributes"] == {"animal": ["apple", "zebra"]}     # sorted folder names
    assert meta["source"] == "folders" and meta["n"] == 5 and meta["eta"] == 0.0
    sh0, sh1 = _shard(out, 0), _shard(out, 1)
    labels = torch.cat([sh0["labels"]["animal"], sh1["labels"]["animal"]]).tolist()
    assert labels == [0, 0, 1, 1, 1]
    ids = sh0["ids"] + sh1["ids"]
    assert [os.path.basename(os.path.dirname(p)) for p in ids] == ["apple"] * 2 + ["zebra"] * 3
    assert tuple(sh0["h"].shape) == (4, 5, *net.h_shape)

    # one inversion step by hand: x0 -> x_{tau_1}; h at tau_1 is the last (t smallest) entry
    from utils.data.extract import load_image
    x0 = torch.stack([load_image(p, 16, 1) for p in sh0["ids"]])
    t1 = sampler.timesteps[-1]
    a1 = schedule.alpha_bar(t1)
    with torch.no_grad():
        eps = net(x0, torch.full((4,), t1))
        x1 = math.sqrt(a1) * x0 + math.sqrt(1 - a1) * eps
        h1, _ = net.encode(x1, torch.full((4,), t1))
    torch.testing.assert_close(sh0["h"][:, -1].float(), h1, rtol=2e-3, atol=2e-3)


def test_folder_errors_name_the_folder_or_file(sampler, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        extract_from_folders(sampler, missing, "a", tmp_path / "o1", META)

    flat = tmp_path / "flat"
    _png(flat / "loose.png", 100)
    with pytest.raises(ValueError, match=re.escape(str(flat)) + ".*no class sub-folders"):
        extract_from_folders(sampler, flat, "a", tmp_path / "o2", META)

    root = _class_folders(tmp_path / "withempty")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(root / "empty")) + ".*no images"):
        extract_from_folders(sampler, root, "a", tmp_path / "o3", META)

    root = _class_folders(tmp_path / "withgarbage")
    bad = root / "zebra" / "x.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        extract_from_folders(sampler, root, "a", tmp_path / "o4", META, batch_size=8)


def test_second_extraction_with_other_timesteps_is_refused(net, schedule, sampler, tmp_path):
    out = tmp_path / "pseudo"
    extract_pseudo_labelled(sampler, [0], BrightnessLabeller(), out, META, batch_size=2)
    other = DDIMSampler(net, schedule, num_steps=4, eta=1.0)
    with pytest.raises(ValueError, match="timesteps"):
        extract_pseudo_labelled(other, [0], BrightnessLabeller(), out, META, batch_size=2)
    assert read_meta(out)["timesteps"] == sampler.timesteps


def test_load_h_dataset_concatenates_shards_in_requested_attribute_order(net, sampler, tmp_path):
    out = tmp_path / "pseudo"
    extract_pseudo_labelled(sampler, list(range(5)), BrightnessLabeller(), out, META, batch_size=2)
    shards = [_shard(out, k) for k in range(3)]
    meta, h, labels = load_h_dataset([out], ["contrast", "bright"])
    d = int(np.prod(net.h_shape))
    assert h.shape == (5, 5, d) and h.dtype == torch.float16
    assert torch.equal(h, torch.cat([s["h"].reshape(len(s["h"]), 5, d) for s in shards]))
    assert list(labels) == ["contrast", "bright"]
    for a in labels:
        assert torch.equal(labels[a], torch.cat([s["labels"][a] for s in shards]))
    assert meta["timesteps"] == sampler.timesteps
    assert set(meta["attributes"]) == {"contrast", "bright"}

    _, _, only = load_h_dataset([out], ["contrast"])
    assert list(only) == ["contrast"]
    _, _, default = load_h_dataset([out])
    assert list(default) == ["bright", "contrast"]              # the folder's own order
