"""Every text-to-image family through its stock diffusers pipeline and the one h-space hook, on tiny
random components built here (models.tiny_families; nothing downloaded): scale 0 is the stock
pipeline bit for bit, h is the named module's output (pooled), a guided step moves the
conditional rows' estimate to the target, images do not depend on the batch size, extract ->
train -> balanced run from the command line, and the published configs' h shapes on the meta device."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import main as entry  # noqa: E402
from models.adp import ADP  # noqa: E402
from models.hspace import HSpaceHook, find_module, grid_to_tokens, tokens_to_grid  # noqa: E402
from models.t2i import FAMILIES, h_spec  # noqa: E402
from models.tiny_families import CALL_KWARGS, TINY_RESOLUTION, meta_denoiser, meta_inputs, save_tiny  # noqa: E402
from helpers import save_tiny_clip  # noqa: E402
from utils.app.config import load_config  # noqa: E402
from utils.guidance import build_plan  # noqa: E402
from utils.guidance.guide import Guide  # noqa: E402
from utils.sampling.text2image import FIXED_KWARGS, load_t2i  # noqa: E402

STEPS = 3
PROMPT = "a photo of a doctor"
ALL = list(FAMILIES)
#: the tiny models' h: pooled 8x8 -> 4x4 where the grid is 8x8 (sd's 4x4 grid is kept whole)
POOL = {f: (None if f == "sd" else 4) for f in ALL}
PUBLISHED_CONFIG = {"sd": "configs/sd15.yml", **{f: f"configs/{f}.yml" for f in ALL if f != "sd"}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny(f, root / f) for f in ALL}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


def cfg_for(family, folder, **extra):
    model = {"family": family, "checkpoint": str(folder), "resolution": TINY_RESOLUTION[family]}
    if POOL[family] is not None:
        model["h_pool"] = POOL[family]
    cfg = {"name": f"tiny_{family}", "model": model,
           "sampling": {"steps": STEPS, "eta": 0.0, "cfg": CALL_KWARGS[family]["guidance_scale"]}}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def pipes(folders):
    return {f: load_t2i(cfg_for(f, folders[f]), torch.device("cpu")).with_prompt(PROMPT) for f in ALL}


def random_adp(pipe, seed=0) -> ADP:
    """Random 'gender' heads on the pipeline's h at its timesteps, h standardised by a vanilla
    run's statistics (so the logits are O(1)), directions = raw weights."""
    record = []
    pipe.draw(list(range(100, 108)), record=record)
    torch.manual_seed(seed)
    grid = [int(round(t)) for t in pipe.timesteps]
    adp = ADP(pipe.h_shape, sorted(set(grid)), {"gender": ["female", "male"]})
    with torch.no_grad():
        for s, t in enumerate(adp.timesteps):
            h = record[grid.index(t)].float().reshape(8, -1)
            adp.mean[s], adp.std[s] = h.mean(0), h.std(0).clamp_min(1e-3)
            adp.weight["gender"][s] = torch.randn(2, adp.mean.shape[1]) / adp.mean.shape[1] ** 0.5
            adp.dir_gender[s] = adp.raw_weight("gender", s)
    adp.class_prior = {"gender": [0.5, 0.5]}
    return adp.eval()


def guide_for(pipe, adp, mode="distribution", target="0.5", scale=None, **over):
    plan = build_plan({"model": {"family": pipe.family}, "guidance": {"preset": "ours"}}, mode, {"gender": target},
                      adp.attributes, {"check": False, "refine": False, **over}, scale, adp.class_prior)
    return Guide(plan, adp, pipe.betas)


def stock_images(pipe, seeds):
    """The family's stock pipeline called directly, as a user would."""
    _, hgt, wid = pipe.image_shape
    takes = pipe.call_parameters()
    extra = {k: v for k, v in FIXED_KWARGS.items() if k in takes}
    out = pipe.pipe(prompt=[PROMPT] * len(seeds), num_inference_steps=STEPS, guidance_scale=pipe.cfg_scale,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], height=hgt, width=wid,
                    output_type="pt", **extra)
    return out.images.float() * 2 - 1


@pytest.mark.parametrize("family", ALL)
def test_scale_zero_gives_the_stock_pipelines_images_bit_for_bit(pipes, family):
    pipe = pipes[family]
    guide = guide_for(pipe, random_adp(pipe), scale="0")
    assert torch.equal(pipe.draw([0, 1, 2], guide.start([0, 1, 2])), stock_images(pipe, [0, 1, 2]))


@pytest.mark.parametrize("family", ALL)
def test_h_is_the_named_modules_image_output_pooled_at_the_schedulers_timesteps(pipes, family):
    pipe = pipes[family]
    spec = pipe.hspec
    module = find_module(pipe.denoiser, spec.module)
    outputs, steps = [], []
    handle = module.register_forward_hook(
        lambda m, a, out: outputs.append((out[spec.stream] if isinstance(out, tuple) else out).detach().clone()))
    try:
        record = []
        pipe.draw([3, 4], record=record)
    finally:
        handle.remove()
    assert len(record) == len(outputs) == STEPS
    cfg_rows = FAMILIES[family].cfg_rows
    for h, out in zip(record, outputs):
        assert len(out) == (4 if cfg_rows else 2)                          # Flux: no CFG rows
        grid = out if out.ndim == 4 else tokens_to_grid(out, spec.grid)
        want = grid if spec.pool is None else F.adaptive_avg_pool2d(grid, spec.pool)
        assert tuple(h.shape[1:]) == pipe.h_shape
        assert torch.equal(h, want[-2:].half())                            # the conditional rows
    with HSpaceHook(pipe.denoiser, lambda h, step: steps.append(step), images=2 if cfg_rows else None,
                    **spec.hook_kwargs()):
        pipe.pipe(**pipe._kwargs([PROMPT] * 2, [3, 4]))
    assert [s.i for s in steps] == list(range(STEPS))
    assert [s.t for s in steps] == pytest.approx(pipe.timesteps, abs=1e-3)   # the run.json map is the truth
    assert {s.n_uncond for s in steps} == {2 if cfg_rows else 0}


def test_a_pooled_edit_moves_the_pooled_h_by_exactly_the_edit():
    torch.manual_seed(0)
    tokens = torch.randn(3, 64, 16)
    hook = HSpaceHook(torch.nn.Linear(1, 1), lambda h, s: None, module="", pool=4, grid=(8, 8))
    h = hook.read(tokens)
    new = h + torch.randn_like(h)
    back = hook.write(tokens, h, new)
    assert torch.allclose(hook.read(back), new, atol=1e-5)
    cells = (back - tokens).reshape(3, 4, 2, 4, 2, 16)                    # each 2x2 cell moved alike
    assert torch.allclose(cells, cells[:, :, :1, :, :1].expand_as(cells), atol=1e-5)
    assert torch.equal(grid_to_tokens(tokens_to_grid(tokens, (8, 8))), tokens)


def _estimate(adp, h, t):
    return torch.softmax(adp.logits_at(h, adp.head_index(t, "nearest"), ["gender"])["gender"], 1).mean(0)


@pytest.mark.parametrize("family", ALL)
def test_one_guided_step_moves_the_conditional_rows_estimate_to_the_target(pipes, family):
    """Through the hook in a real run: at the first guided step the conditional rows' ADP
    estimate moves towards the target; with CFG rows (ours) both halves get the same delta h."""
    pipe = pipes[family]
    adp = random_adp(pipe)
    seen = []

    class Probe:                              # the batch guide, with each step's h kept
        def __init__(self, target):
            self.batch = guide_for(pipe, adp, target=target).start([0, 1, 2, 3])

        def edit(self, h, step):
            new = self.batch.edit(h, step)
            seen.append((h.clone(), new.clone(), step))
            return new
    record = []
    pipe.draw([0, 1, 2, 3], record=record)
    t0 = pipe.timesteps[1]
    p_male = float(_estimate(adp, record[1].float(), t0)[1])
    target = 1.0 if p_male < 0.5 else 0.0                               # towards the minority class
    images = pipe.draw([0, 1, 2, 3], Probe(f"{target}"))          # the share of class 1 (male)
    h, new, step = next(x for x in seen if x[2].i >= 1)
    n = step.n_uncond
    assert n == (4 if FAMILIES[family].cfg_rows else 0)
    cond, new_cond = h[n:], new[n:]
    want = torch.tensor([1 - target, target])
    before = (_estimate(adp, cond.float(), step.t) - want).abs().sum()
    after = (_estimate(adp, new_cond.float(), step.t) - want).abs().sum()
    assert after < before - 1e-3, (float(before), float(after))
    if n:
        assert torch.allclose(new[:n] - h[:n], new_cond - cond, atol=1e-4)
    assert not torch.equal(images, pipe.draw([0, 1, 2, 3]))


@pytest.mark.parametrize("family", ALL)
def test_images_do_not_depend_on_the_batch_size(pipes, family):
    pipe = pipes[family]
    whole = pipe.draw([5, 6, 7])
    parts = torch.cat([pipe.draw([5, 6]), pipe.draw([7])])
    assert torch.allclose(whole, parts, atol=1e-5)
    guide = guide_for(pipe, random_adp(pipe), mode="sample", target="1")     # per-image guidance
    whole = pipe.draw([5, 6, 7], guide.start([5, 6, 7]))
    parts = torch.cat([pipe.draw([5, 6], guide.start([5, 6])), pipe.draw([7], guide.start([7]))])
    assert torch.allclose(whole, parts, atol=1e-4)


def _run(capsys, *argv):
    rc = entry.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("family", [f for f in ALL if f != "sd"])     # sd: tests/test_sd.py
def test_extract_train_and_a_balanced_run_from_the_command_line(capsys, tmp_path, folders, clip_folder, family):
    import yaml
    import multi_classifier
    cfg = cfg_for(family, folders[family], guidance={"preset": "ours"},
                  labeller={"kind": "clip", "model": str(clip_folder),
                            "attributes": {"gender": {"female": "a photo of a woman", "male": "a photo of a man"}}})
    cfg_path = tmp_path / f"tiny_{family}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    h_dir, adp_path, out = tmp_path / "h", tmp_path / "adp.pt", tmp_path / "run"
    rc, err = _run(capsys, "--config", cfg_path, "--extract_pseudo", 8, "--prompt", PROMPT, "--bs_test", 4,
                   "--savepath", h_dir)
    assert rc == 0, err
    meta = json.loads((h_dir / "meta.json").read_text())
    pipe = load_t2i(cfg, torch.device("cpu"))
    assert meta["h_shape"] == list(pipe.h_shape) and meta["model"]["h_module"] == pipe.hspec.module
    assert meta["timesteps"] == [int(round(t)) for t in pipe.timesteps]
    assert multi_classifier.main(["--data", str(h_dir), "--attributes", "gender", "--out", str(adp_path),
                                  "--epochs", "2"]) == 0
    rc, err = _run(capsys, "--config", cfg_path, "--adp", adp_path, "--prompt", PROMPT, "--mode", "distribution",
                   "--target", "gender=0.5", "--n_test_img", 4, "--bs_test", 2, "--running_balance", "--exp", out)
    assert rc == 0, err
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["running_balance"]["count"] == 4
    assert rec["model"]["family"] == family and len(rec["resolved"]["heads"]) == STEPS
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{s:06d}.png" for s in range(4)]
    other = dict(cfg, model={**cfg["model"], "h_module": "mid_block" if family == "sdxl" else
                             f"{FAMILIES[family].blocks}.0"})
    if other["model"]["h_module"] != pipe.hspec.module:                  # a head from another block is refused
        cfg_path.write_text(yaml.safe_dump(other))
        rc, err = _run(capsys, "--config", cfg_path, "--adp", adp_path, "--prompt", PROMPT, "--mode",
                       "distribution", "--target", "gender=0.5", "--n_test_img", 2, "--bs_test", 2,
                       "--exp", tmp_path / "other")
        assert rc == 2 and "h_module" in err


class _Meta:
    """The attributes of a pipeline that h_spec reads, around a meta-device denoiser."""
    def __init__(self, family, net, vae_scale_factor):
        setattr(self, FAMILIES[family].denoiser, net)
        self.vae_scale_factor = vae_scale_factor


@pytest.mark.parametrize("family", ALL)
def test_the_published_configs_give_their_stated_h_shape_on_the_meta_device(family):
    from models.tiny_families import PUBLISHED
    cfg = load_config(PUBLISHED_CONFIG[family])
    m = cfg["model"]
    net = meta_denoiser(family)
    pipe = _Meta(family, net, PUBLISHED[family]["vae_scale_factor"])
    spec = h_spec(pipe, family, int(m["resolution"]), m.get("h_module"), m.get("h_pool", "default"))
    assert spec.shape == tuple(m["h_shape"])
    seen = []
    cfg_rows = FAMILIES[family].cfg_rows
    with torch.no_grad(), HSpaceHook(net, lambda h, step: seen.append((tuple(h.shape), step.n_uncond)),
                                     images=1 if cfg_rows else None, **spec.hook_kwargs()):
        net(**meta_inputs(family, batch=2))
    assert seen == [((2, *m["h_shape"]), 1 if cfg_rows else 0)]
