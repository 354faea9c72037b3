"""The text-to-image sd family on tiny random components built here (offline): the stock
diffusers pipeline with h read and edited at mid_block by the h-space hook."""
import json
import numpy as np

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import main as entry  # noqa: E402
from models.adp import ADP, ClassifierMismatchError  # noqa: E402
from models.hspace import HSpaceHook, Step  # noqa: E402
from models.t2i import h_shape, load_pipeline, resolve_model  # noqa: E402
from models.sd_tiny import SD15_UNET, save_tiny_sd  # noqa: E402
from helpers import save_tiny_clip  # noqa: E402
from utils.guidance import build_plan  # noqa: E402
from utils.guidance.guide import Guide  # noqa: E402
from utils.guidance.settings import resolve_settings  # noqa: E402
from utils.sampling.text2image import T2IPipeline, load_t2i  # noqa: E402

STEPS = 5
PROMPT = "a photo of a doctor"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


def cfg_for(sd_folder, clip_folder=None, **extra):
    cfg = {"name": "tiny_sd", "model": {"family": "sd", "checkpoint": str(sd_folder)},
           "sampling": {"steps": STEPS, "eta": 0.0, "cfg": 7.5}}
    if clip_folder is not None:
        cfg["labeller"] = {"kind": "clip", "model": str(clip_folder),
                           "attributes": {"gender": {"female": "a photo of a woman", "male": "a photo of a man"}}}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def t2i(sd_folder):
    return load_t2i(cfg_for(sd_folder), torch.device("cpu")).with_prompt(PROMPT)


def tiny_adp(pipe: T2IPipeline, timesteps=None, seed=0) -> ADP:
    """Random heads for 'gender' on the tiny model's h with directions = raw weights."""
    torch.manual_seed(seed)
    adp = ADP(pipe.h_shape, timesteps or [int(t) for t in pipe.timesteps], {"gender": ["female", "male"]})
    with torch.no_grad():
        for s in range(len(adp.timesteps)):
            adp.weight["gender"][s] = torch.randn(2, adp.mean.shape[1]) * 0.05
            adp.dir_gender[s] = adp.raw_weight("gender", s)
    adp.class_prior = {"gender": [0.5, 0.5]}
    return adp.eval()


def test_sd15_unet_config_gives_h_1280x8x8_for_64x64_latents():
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        seen = []
        with HSpaceHook(unet, lambda h, step: seen.append(tuple(h.shape))):
            unet(torch.zeros(2, 4, 64, 64), 981, encoder_hidden_states=torch.zeros(2, 77, 768))
    assert seen == [(2, 1280, 8, 8)]
    assert h_shape(unet, 512) == (1280, 8, 8)


def test_the_hook_reads_mid_blocks_output_and_the_schedulers_timestep(t2i):
    seen, record = [], []
    handle = t2i.pipe.unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        t2i.draw([3, 4], record=record)
    finally:
        handle.remove()
    assert len(record) == len(seen) == STEPS
    for h, full in zip(record, seen):
        assert full.shape[0] == 4                           # CFG: [uncond; cond] rows
        assert torch.equal(h, full[2:].half())              # the conditional rows
    times = []
    with HSpaceHook(t2i.pipe.unet, lambda h, step: times.append((step.t, step.i))):
        t2i.draw([3])
    assert times == [(float(t), i) for i, t in enumerate(t2i.timesteps)]


def test_scale_zero_gives_the_stock_pipelines_images_bit_for_bit(t2i):
    adp = tiny_adp(t2i)
    plan = build_plan({"model": {"family": "sd"}, "guidance": {"preset": "ours"}}, "distribution",
                      {"gender": "0.5"}, adp.attributes, {"check": False}, "0", adp.class_prior)
    guide = Guide(plan, adp, t2i.betas)
    guided = t2i.draw([0, 1, 2], guide.start([0, 1, 2]))
    stock = t2i.pipe(prompt=[PROMPT] * 3, num_inference_steps=STEPS, guidance_scale=7.5, height=16, width=16,
                     generator=[torch.Generator().manual_seed(s) for s in (0, 1, 2)], output_type="pt").images
    assert torch.equal(guided, stock.float() * 2 - 1)


def test_images_do_not_depend_on_the_batch_size(t2i):
    whole = t2i.draw([5, 6, 7, 8])
    parts = torch.cat([t2i.draw([5, 6]), t2i.draw([7]), t2i.draw([8])])
    assert torch.allclose(whole, parts, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1], atol=1e-2)       # seeds differ


def _estimate(adp, h, t):
    return torch.softmax(adp.logits_at(h, adp.head_index(t), ["gender"])["gender"], 1).mean(0)


@pytest.mark.parametrize("preset", ["ours", "paper"])
def test_one_guided_step_moves_the_conditional_rows_estimate_to_the_target(t2i, preset):
    adp = tiny_adp(t2i)
    n, t = 4, adp.timesteps[2]
    h = torch.randn(2 * n, *t2i.h_shape)
    target = 1.0 - float(_estimate(adp, h[n:], t)[0] > 0.5)        # push towards the minority class
    plan = build_plan({"model": {"family": "sd"}, "guidance": {"preset": preset}}, "distribution",
                      {"gender": f"{1 - target}"}, adp.attributes, {"check": False, "refine": False},
                      None, adp.class_prior)
    new = Guide(plan, adp, t2i.betas).start(list(range(n))).edit(h, Step(2, float(t), n_uncond=n))
    want = torch.tensor([target, 1 - target])
    before = (_estimate(adp, h[n:], t) - want).abs().sum()
    after = (_estimate(adp, new[n:], t) - want).abs().sum()
    assert after < before - 1e-3
    if preset == "ours":      # estimate from the conditional rows, the same delta on both halves
        assert torch.allclose(new[:n] - h[:n], new[n:] - h[n:], atol=1e-5)


def test_edit_on_the_conditional_half_only_leaves_the_unconditional_rows(t2i):
    adp = tiny_adp(t2i)
    plan = build_plan({"model": {"family": "sd"}, "guidance": {"preset": "ours"}}, "distribution",
                      {"gender": "0.5"}, adp.attributes, {"check": False, "cfg_edit": "cond"}, None, adp.class_prior)
    h = torch.randn(6, *t2i.h_shape)
    new = Guide(plan, adp, t2i.betas).start([0, 1, 2]).edit(h, Step(1, float(adp.timesteps[1]), n_uncond=3))
    assert torch.equal(new[:3], h[:3]) and not torch.equal(new[3:], h[3:])


def test_the_sd_paper_preset_is_the_original_sd_code():
    s = resolve_settings({"preset": "paper"}, family="sd")
    assert (s.loss, s.temperature, s.step_factor, s.beta_power, s.distribution_scale, s.first_step,
            s.cfg_estimate, s.cfg_edit, s.direction) == ("kl", 8.0, 600.0, 0.0, (500.0,), 0, "both", "both", "gradient")
    assert resolve_settings({"preset": "paper"}).loss == "chi_square"        # the unconditional paper


def test_the_sd_paper_sample_step_is_the_original_sd_codes(t2i):
    """The original SD code's sample guidance, written out from its equations on random heads:
    every row of the CFG batch, logits = h W_i^T + b_i (raw, no softmax or temperature),
    L = -sum_rows logits[:, c], h <- h - 600 * dL/dh (so each row moves by 600 W_i[c])."""
    import torch.nn.functional as F
    grid = sorted(int(t) for t in t2i.timesteps)
    d = int(torch.tensor(t2i.h_shape).prod())
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(len(grid), 2, d, generator=g) * 0.05, torch.randn(len(grid), 2, generator=g)
    sd = {k: v for i in range(len(grid)) for k, v in ((f"linears.{i}.weight", w[i]), (f"linears.{i}.bias", b[i]))}
    adp = ADP.from_original({"gender": (sd, ["female", "male"])}, grid, t2i.h_shape)
    n, c, t = 3, 1, 401
    h = torch.randn(2 * n, *t2i.h_shape, generator=g)
    i = grid.index(t)
    x = h.detach().requires_grad_()
    loss = -F.linear(x.reshape(2 * n, -1), w[i], b[i])[:, c].sum()
    want = h - 600 * torch.autograd.grad(loss, x)[0]
    plan = build_plan({"model": {"family": "sd"}, "guidance": {"preset": "paper"}}, "sample", {"gender": str(c)},
                      adp.attributes)
    got = Guide(plan, adp, t2i.betas).start(list(range(n))).edit(h, Step(2, float(t), n_uncond=n))
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    assert torch.allclose(got - h, (600 * w[i][c]).view(1, *t2i.h_shape).expand_as(h), atol=1e-4)


def test_the_paper_preset_samples_with_the_model_folders_own_scheduler(tmp_path, sd_folder):
    """--preset paper: the folder's scheduler as saved (here PNDM, SD 1.5's), unless --scheduler
    says otherwise; other presets and vanilla runs: the config's model.scheduler (ddim)."""
    import shutil
    from diffusers import PNDMScheduler
    import diffusion_latent
    from utils.app.cli import build_parser
    folder = tmp_path / "pndm_sd"
    shutil.copytree(sd_folder, folder)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    cfg = cfg_for(folder, guidance={"preset": "ours"})
    cfg["model"]["scheduler"] = "ddim"

    def scheduler(mode, *flags):
        args = build_parser().parse_args(["--prompt", "x", *flags])
        pipe = diffusion_latent.load_for_run(cfg, args, torch.device("cpu"), mode)
        return type(pipe.pipe.scheduler).__name__
    assert scheduler("distribution", "--preset", "paper") == "PNDMScheduler"
    assert scheduler("sample", "--preset", "paper", "--scheduler", "euler") == "EulerDiscreteScheduler"
    assert scheduler("distribution") == scheduler("distribution", "--preset", "ours") == "DDIMScheduler"
    assert scheduler("vanilla") == "DDIMScheduler"
    assert scheduler("vanilla", "--scheduler", "model") == "PNDMScheduler"


def test_nearest_head_on_another_schedulers_grid_and_the_range_error(t2i):
    adp = tiny_adp(t2i, timesteps=list(range(981, 0, -20)))           # the original's 50-step grid
    assert adp.head_index(990.0, "nearest") == 0 and adp.head_index(11.0, "nearest") == 48
    assert adp.timesteps[adp.head_index(500.4, "nearest")] == 501
    with pytest.raises(ClassifierMismatchError):
        adp.head_index(990, "exact")
    narrow = tiny_adp(t2i, timesteps=[401, 301, 201, 101, 1])
    with pytest.raises(ClassifierMismatchError, match=r"covers: heads for timesteps 1\.\.401"):
        narrow.head_index(999.0, "nearest")
    euler = load_pipeline(resolve_model(str(t2i.model_id["checkpoint"])), torch.device("cpu"), torch.float32, "euler")
    euler.scheduler.set_timesteps(7)
    heads = adp.head_map([float(t) for t in euler.scheduler.timesteps], "nearest")
    assert all(abs(float(t) - h) <= 10 for t, h in heads.items())


def test_clip_labeller_equals_clips_own_zero_shot(clip_folder):
    from transformers import AutoTokenizer, CLIPModel
    from models.labellers import load_labeller
    spec = {"kind": "clip", "model": str(clip_folder), "classes": {"female": "a photo of a woman",
                                                                    "male": "a photo of a man"}, "attribute": "gender"}
    lab = load_labeller(spec)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    probs = lab.predict(x)["gender"]
    model, tok = CLIPModel.from_pretrained(clip_folder), AutoTokenizer.from_pretrained(clip_folder)
    ids = tok(["a photo of a woman", "a photo of a man"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**ids, pixel_values=lab.pixel_values(x)).logits_per_image.softmax(1)
    assert torch.allclose(probs, want, atol=1e-5)
    swapped = load_labeller({**spec, "classes": {"male": "a photo of a man", "female": "a photo of a woman"}})
    assert torch.allclose(swapped.predict(x)["gender"], probs.flip(1), atol=1e-5)


def test_clip_judge_from_a_config_with_its_calibration(tmp_path, clip_folder):
    import json
    from models.judge import confusion_record
    from models.labellers import load_labeller
    from utils.evaluation.evaluate import judge_from_config
    classes = {"female": "a photo of a woman", "male": "a photo of a man"}
    record = confusion_record({"gender": np.array([[9, 1], [2, 8]])}, {"gender": ["female", "male"]}, data="test")
    (tmp_path / "cal.json").write_text(json.dumps(record))
    spec = {"kind": "clip", "model": str(clip_folder), "attribute": "gender", "classes": classes}
    judge = judge_from_config({"judge": {**spec, "calibration": str(tmp_path / "cal.json")}})
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(judge.predict(x)["gender"], load_labeller(spec).predict(x)["gender"])
    assert judge.confusion_counts()["gender"].tolist() == [[9, 1], [2, 8]]
    assert judge_from_config({"judge": spec}).confusion_counts() == {}
    wrong = confusion_record({"gender": np.eye(2)}, {"gender": ["male", "female"]})
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="recalibrate"):
        judge_from_config({"judge": {**spec, "calibration": str(tmp_path / "wrong.json")}})
    with pytest.raises(FileNotFoundError, match="calibration file"):
        judge_from_config({"judge": {**spec, "calibration": str(tmp_path / "none.json")}})
    with pytest.raises(ValueError, match="mapping kinds"):
        load_labeller({"kind": "blip", "model": str(clip_folder)})


def _run(capsys, *argv):
    capsys.readouterr()
    rc = entry.main(["--device", "cpu", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_extract_train_and_a_balanced_run_per_prompt_from_the_command_line(capsys, tmp_path, sd_folder, clip_folder):
    import yaml
    import multi_classifier
    cfg = cfg_for(sd_folder, clip_folder, guidance={"preset": "ours"})
    cfg_path = tmp_path / "tiny_sd.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a doctor\n\na photo of a nurse\n")
    h_dir = tmp_path / "h"
    cfg["labeller"]["model"] = "openai/clip-not-here"           # --labeller FOLDER replaces it
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc, err = _run(capsys, "--config", cfg_path, "--extract_pseudo", 8, "--prompts", prompts, "--bs_test", 4,
                   "--savepath", h_dir, "--labeller", clip_folder)
    assert rc == 0, err
    meta = json.loads((h_dir / "meta.json").read_text())
    assert meta["h_shape"] == [64, 4, 4] and meta["timesteps"] == [801, 601, 401, 201, 1]
    assert meta["text"]["prompts"] == ["a photo of a doctor", "a photo of a nurse"]
    adp_path = tmp_path / "adp.pt"
    assert multi_classifier.main(["--data", str(h_dir), "--attributes", "gender", "--out", str(adp_path),
                                  "--epochs", "2"]) == 0
    out = tmp_path / "run"
    cfg_path.write_text(yaml.safe_dump(cfg_for(sd_folder, clip_folder, guidance={"preset": "ours"})))
    rc, err = _run(capsys, "--config", cfg_path, "--adp", adp_path, "--prompts", prompts, "--mode", "distribution",
                   "--target", "gender=0.5", "--n_test_img", 4, "--bs_test", 2, "--exp", out)
    assert rc == 0, err
    for k, prompt in enumerate(["a photo of a doctor", "a photo of a nurse"]):
        rec = json.loads((out / f"p{k:03d}" / "run.json").read_text())
        assert rec["status"] == "complete" and rec["resolved"]["text"]["prompt"] == prompt
        assert rec["resolved"]["heads"] == {"801": 801, "601": 601, "401": 401, "201": 201, "1": 1}
        assert rec["running_balance"]["count"] == 4                 # each prompt its own balance
        assert sorted(p.name for p in (out / f"p{k:03d}").glob("0*.png")) == [f"{s:06d}.png" for s in range(4)]
    rc, err = _run(capsys, "--config", cfg_path, "--adp", adp_path, "--prompt", "x", "--mode", "distribution",
                   "--target", "gender=0.5", "--exp", tmp_path / "r2", "--scheduler", "euler", "--steps", 3,
                   "--guide_steps", "0:", "--n_test_img", 2, "--bs_test", 2, "--preset", "paper")
    assert rc == 0, err
    heads = json.loads((tmp_path / "r2" / "run.json").read_text())["resolved"]["heads"]
    assert set(heads.values()) <= {801, 601, 401, 201, 1} and len(heads) == 3


def test_text_to_image_errors_are_clear(capsys, tmp_path, sd_folder):
    rc, err = _run(capsys, "--prompt", "a digit", "--exp", tmp_path / "o")     # the digits config
    assert rc == 2 and "text-to-image flag" in err
    import yaml
    cfg_path = tmp_path / "c.yml"
    cfg_path.write_text(yaml.safe_dump(cfg_for(sd_folder)))
    rc, err = _run(capsys, "--config", cfg_path, "--exp", tmp_path / "o")
    assert rc == 2 and "needs --prompt" in err
    rc, err = _run(capsys, "--config", cfg_path, "--model", tmp_path / "nowhere", "--prompt", "x", "--exp", tmp_path / "o")
    assert rc == 2 and "not found" in err
    assert not (tmp_path / "o").exists()


def test_import_of_the_original_sd_heads(tmp_path):
    """50 heads linears.{i} Linear(81920 -> 2) on [1, 21, ..., 981]: logits equal the original's."""
    import multi_classifier
    torch.manual_seed(0)
    sd = {}
    for i in range(50):
        sd[f"linears.{i}.weight"], sd[f"linears.{i}.bias"] = torch.randn(2, 81920) * 0.01, torch.randn(2)
    torch.save(sd, tmp_path / "gender.pt")
    out = tmp_path / "adp.pt"
    assert multi_classifier.main(["--import_original", str(tmp_path / "gender.pt"), "--attribute", "gender",
                                  "--classes", "female,male", "--config", "configs/sd15.yml", "--out", str(out)]) == 0
    adp = ADP.load(out)
    assert adp.h_shape == (1280, 8, 8) and adp.timesteps == list(range(1, 1000, 20))
    h = torch.randn(3, 1280, 8, 8)
    s = adp.head_index(501.0, "nearest")
    assert adp.timesteps[s] == 501
    want = h.flatten(1) @ sd[f"linears.{s}.weight"].T + sd[f"linears.{s}.bias"]
    assert torch.allclose(adp.logits_at(h, s)["gender"], want, atol=1e-4)


def test_the_fairness_harness_on_the_tiny_pipeline_with_the_clip_judge(tmp_path, sd_folder, clip_folder):
    import yaml
    from bench.t2i_fairness import main as fairness
    spec = {"kind": "clip", "model": str(clip_folder),
            "attributes": {"gender": {"female": "a photo of a woman", "male": "a photo of a man"}}}
    cfg = cfg_for(sd_folder, clip_folder, judge=spec)
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "p.txt").write_text("# source: a test\na photo of a doctor\n")
    out = tmp_path / "out"
    assert fairness(["--config", str(tmp_path / "tiny.yml"), "--prompts", str(tmp_path / "p.txt"),
                     "--attribute", "gender", "--target", "0.5", "--method", "vanilla,augment",
                     "--n", "4", "--bs", "2", "--n_boot", "50", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "fairness.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["vanilla", "augment"]
    vanilla, augment = report["rows"]
    assert vanilla["prompts_used"] == ["a photo of a doctor"]
    assert augment["prompts_used"] == ["a photo of a doctor, female", "a photo of a doctor, male"]
    assert all(r["n"] == 4 and r["no_face"] == 0 and 0 <= r["clip_score"] <= 100 for r in report["rows"])
    assert (out / "fairness.png").is_file()
