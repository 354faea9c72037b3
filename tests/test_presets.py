"""The paper preset is the original code's step, literally; the original's classifiers import
with identical logits and run with it on the CelebA-HQ P2 architecture (random weights, 64 px);
the 'ours' preset on an imported classifier asks for directions; the original's grid.
"""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import multi_classifier
from helpers import BETAS
from main import main
from models.adp import ADP, ClassifierMismatchError
from models.files import resolve_path
from models.hspace import Step
from utils.guidance import build_plan
from utils.guidance.guide import Guide
from utils.guidance.settings import PRESETS, resolve_settings
from utils.sampling.diffusion import ddim_timesteps

ORIGINAL_GRID = [0, 20, 40, 61, 81, 101, 122, 142, 163, 183, 203, 224, 244, 265, 285, 305, 326, 346,
                 366, 387, 407, 428, 448, 468, 489, 509, 530, 550, 570, 591, 611, 632, 652, 672, 693,
                 713, 733, 754, 774, 795, 815, 835, 856, 876, 897, 917, 937, 958, 978, 999]   # its get_timetstep


# ---- a transcription of the original code (multi_classifier.py / h_classification.py and the
# ---- update in its guided-diffusion U-Net), kept as close to its text as the test allows
def original_distribution_gradient(x, t_index, heads, male, scale):
    """gradients_point_five: chi-square of the batch-mean softmax(logits / 8) to [1 - male, male]."""
    temperature = 8
    x = x.detach().requires_grad_()
    grads = []
    for (w, b) in heads:
        logits = F.linear(x.reshape(x.shape[0], -1), w[t_index], b[t_index]) / temperature
        logits = F.softmax(logits, dim=1)
        m = torch.mean(logits, dim=0)
        loss = ((m[0] - (1 - male)) ** 2) / (1 - male) + ((m[1] - male) ** 2) / male
        grads.append(torch.autograd.grad(loss * 300, x)[0])
    return sum(g * s for g, s in zip(grads, scale))


def original_sample_gradient(x, t_index, head, male, scale):
    """gradients (sample guidance): -sum softmax(logits / 8)[:, male]."""
    x = x.detach().requires_grad_()
    w, b = head
    logits = F.softmax(F.linear(x.reshape(x.shape[0], -1), w[t_index], b[t_index]) / 8, dim=1)
    loss = -(logits[:, int(male)].sum())
    return torch.autograd.grad(loss * 300, x)[0] * scale[0]


def original_update(h, gradients, bt):
    return h.detach() - gradients * 1.5 * (bt ** 0.05)


def assert_same_step(got, want, h):
    """Equal to float32 round-off: the two sum the same terms in another order."""
    step = (want - h).abs().max()
    assert step > 1e-2                                          # the step is not trivially zero
    assert (got - want).abs().max() <= 1e-5 * step + 1e-6, float((got - want).abs().max() / step)


# ---- helpers -----------------------------------------------------------------------------------
H_SHAPE = (8, 2, 2)
GUIDED = sorted(ORIGINAL_GRID[:-1])          # 49 heads, none for t = 999


def random_heads(seed, n=49, d=32, k=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, d, generator=g) * 0.3, torch.randn(n, k, generator=g) * 0.1


def state_dict_of(w, b, older=False):
    mid = ".0" if older else ""
    sd = {}
    for i in range(len(w)):
        sd[f"linears.{i}{mid}.weight"], sd[f"linears.{i}{mid}.bias"] = w[i].clone(), b[i].clone()
    return sd


def imported_adp(heads: dict):
    return ADP.from_original({a: (state_dict_of(w, b), ["c0", "c1"]) for a, (w, b) in heads.items()},
                             GUIDED, H_SHAPE)


def paper_guide(adp, raw, mode="distribution"):
    plan = build_plan({}, mode, raw, adp.attributes)            # no guidance: section -> paper
    assert plan.settings.preset == "paper"
    return Guide(plan, adp, BETAS)


# ---- the grid -----------------------------------------------------------------------------------
def test_original_grid_is_the_originals_list():
    assert ddim_timesteps(1000, 50, "original")[::-1] == ORIGINAL_GRID
    uniform = ddim_timesteps(1000, 50, "uniform")[::-1]
    assert sum(a != b for a, b in zip(uniform, ORIGINAL_GRID)) == 24      # 41 vs 40, 979 vs 978, ...


def test_face_configs_sample_on_the_original_grid():
    for name in ("celeba_hq_p2", "ffhq_p2", "metfaces_p2", "celeba_hq_ddpm", "celeba_hq_diffusers"):
        cfg = yaml.safe_load(resolve_path(f"configs/{name}.yml").read_text())
        assert cfg["sampling"]["skip_type"] == "original", name


# ---- the paper preset is the original's step ----------------------------------------------------
@pytest.mark.parametrize("male", [0.5, 0.3])
def test_paper_step_equals_the_original_one_attribute(male):
    w, b = random_heads(0)
    adp = imported_adp({"gender": (w, b)})
    h = torch.randn(6, *H_SHAPE, generator=torch.Generator().manual_seed(1)) * 2
    for t in (978, 489, 20):
        i = ORIGINAL_GRID.index(t)
        want = original_update(h, original_distribution_gradient(h, i, [(w, b)], male, [1500]), float(BETAS[t]))
        got = paper_guide(adp, {"gender": str(male)}).start(list(range(6))).edit(h, Step(1, t))
        assert_same_step(got, want, h)


def test_paper_step_equals_the_original_two_attributes_and_sample_mode():
    (w1, b1), (w2, b2) = random_heads(2), random_heads(3)
    adp = imported_adp({"eyeglasses": (w1, b1), "gender": (w2, b2)})
    h = torch.randn(5, *H_SHAPE, generator=torch.Generator().manual_seed(4))
    t = 611
    i, bt = ORIGINAL_GRID.index(t), float(BETAS[t])
    want = original_update(h, original_distribution_gradient(h, i, [(w1, b1), (w2, b2)], 0.5, [1500, 700]), bt)
    got = paper_guide(adp, {"eyeglasses": "0.5", "gender": "0.5"}).start(list(range(5))).edit(h, Step(3, t))
    assert_same_step(got, want, h)
    want = original_update(h, original_sample_gradient(h, i, (w2, b2), 1, [15]), bt)
    got = paper_guide(adp, {"gender": "1"}, mode="sample").start(list(range(5))).edit(h, Step(3, t))
    assert_same_step(got, want, h)


def test_paper_preset_guides_every_step_but_the_first():
    adp = imported_adp({"gender": random_heads(0)})
    b = paper_guide(adp, {"gender": "0.5"}).start([0, 1])
    h = torch.randn(2, *H_SHAPE)
    assert torch.equal(b.edit(h, Step(0, 999)), h)                   # t = 999 has no head and no step
    assert not torch.equal(b.edit(h, Step(1, 978)), h)


def test_presets_are_complete_and_paper_is_the_default():
    assert set(PRESETS["paper"]) == set(PRESETS["ours"])
    s = resolve_settings(None)
    assert (s.preset, s.temperature, s.step_factor, s.distribution_scale, s.sample_scale, s.max_step,
            s.debias, s.running_balance, s.refine, s.check, s.direction, s.first_step) == \
        ("paper", 8.0, 450.0, (1500.0, 700.0), 15.0, None, False, False, False, False, "gradient", 1)


def test_config_fields_adjust_their_own_preset_and_another_preset_stays_literal():
    section = {"preset": "ours", "max_step": 0.75, "cap_growth": 50.0}
    ours = resolve_settings(section, family="sd")
    assert (ours.preset, ours.max_step, ours.cap_growth) == ("ours", 0.75, 50.0)
    paper = resolve_settings(section, {"preset": "paper"}, family="sd")
    want = resolve_settings({"preset": "paper"}, family="sd")
    assert paper == want and paper.max_step is None and paper.cap_growth is None
    same = resolve_settings(section, {"preset": "ours", "max_step": 1.5}, family="sd")
    assert (same.max_step, same.cap_growth) == (1.5, 50.0)


# ---- importing the original's classifiers -------------------------------------------------------
def test_imported_logits_equal_the_originals_exactly():
    w, b = random_heads(5)
    for older in (False, True):
        adp = ADP.from_original({"gender": (state_dict_of(w, b, older), ["female", "male"])}, GUIDED, H_SHAPE)
        h = torch.randn(7, *H_SHAPE)
        for t in GUIDED:
            i = ORIGINAL_GRID.index(t)
            want = torch.nn.Linear(32, 2)
            want.load_state_dict({"weight": w[i], "bias": b[i]})
            assert torch.equal(adp.logits(h, t)["gender"], want(h.reshape(7, -1)))   # max difference 0


def test_import_refuses_other_layouts_grids_and_shapes():
    w, b = random_heads(0)
    with pytest.raises(ClassifierMismatchError, match="unexpected entry 'net.weight'"):
        ADP.from_original({"g": ({"net.weight": w[0]}, ["a", "b"])}, GUIDED, H_SHAPE)
    with pytest.raises(ClassifierMismatchError, match="another grid"):
        ADP.from_original({"g": (state_dict_of(w[:40], b[:40]), ["a", "b"])}, GUIDED, H_SHAPE)
    with pytest.raises(ClassifierMismatchError, match=r"expected \[2, 128\]"):
        ADP.from_original({"g": (state_dict_of(w, b), ["a", "b"])}, GUIDED, (32, 2, 2))


def test_ours_preset_on_an_imported_adp_says_how_to_get_directions():
    adp = imported_adp({"gender": random_heads(0)})
    plan = build_plan({"guidance": {"preset": "ours"}}, "distribution", {"gender": "0.5"}, adp.attributes,
                      {"check": False})
    with pytest.raises(ValueError, match="--directions_from"):
        Guide(plan, adp, BETAS)


# ---- end to end: the CelebA-HQ P2 architecture with random weights (64 px) ----------------------
@pytest.fixture(scope="module")
def p2_small(tmp_path_factory):
    """configs/celeba_hq_p2.yml at 64 px and 32 base channels (same blocks, attention, flags),
    random weights saved as a guided-diffusion state dict; 10 sampling steps on the original grid."""
    from models.loader import build_model
    root = tmp_path_factory.mktemp("p2")
    cfg = yaml.safe_load(resolve_path("configs/celeba_hq_p2.yml").read_text())
    cfg["model"].update(image_size=64, model_channels=32, num_head_channels=32, checkpoint=str(root / "p2.pt"))
    cfg["sampling"]["steps"] = 10
    torch.manual_seed(0)
    net = build_model(cfg["model"], "p2_small")
    torch.save(net.state_dict(), root / "p2.pt")
    (root / "p2_small.yml").write_text(yaml.safe_dump(cfg))
    d = int(torch.tensor(net.h_shape).prod())
    w, b = torch.randn(9, 2, d) * 0.05, torch.zeros(9, 2)
    torch.save(state_dict_of(w, b), root / "gender.pt")
    return root, net.h_shape


def test_import_then_paper_run_on_the_p2_architecture(p2_small, tmp_path):
    root, h_shape = p2_small
    adp_path = tmp_path / "gender_original.pt"
    args = ["--import_original", str(root / "gender.pt"), "--attribute", "gender", "--classes", "female,male",
            "--config", str(root / "p2_small.yml"), "--out", str(adp_path)]
    assert multi_classifier.main(args) == 0
    assert multi_classifier.main(args) == 2                       # never overwritten silently
    adp = ADP.load(adp_path)
    assert adp.h_shape == tuple(h_shape) and adp.timesteps == sorted(ddim_timesteps(1000, 10, "original")[1:])
    assert adp.meta["imported"]["grid"] == "original" and len(adp.meta["model"]["checkpoint_sha256"]) == 64
    out = tmp_path / "run"
    assert main(["--config", str(root / "p2_small.yml"), "--adp", str(adp_path), "--device", "cpu",
                 "--mode", "distribution", "--target", "gender=0.5", "--n_test_img", "2", "--bs_test", "2",
                 "--exp", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["guidance"]["settings"]["preset"] == "paper"
    assert run["timesteps"] == ddim_timesteps(1000, 10, "original") and len(list(out.glob("0*.png"))) == 2
    assert main(["--config", str(root / "p2_small.yml"), "--adp", str(adp_path), "--device", "cpu",
                 "--mode", "distribution", "--target", "gender=0.5", "--preset", "ours", "--no-check",
                 "--n_test_img", "2", "--bs_test", "2", "--exp", str(tmp_path / "ours")]) == 2


def test_directions_from_an_extraction_make_ours_run(p2_small, tmp_path):
    root, _ = p2_small
    cfg = str(root / "p2_small.yml")
    imported = tmp_path / "imp.pt"
    assert multi_classifier.main(["--import_original", str(root / "gender.pt"), "--attribute", "gender",
                                  "--config", cfg, "--out", str(imported)]) == 0
    h_dir = tmp_path / "h"
    from utils.app.config import load_config
    from utils.data import extract
    from utils.sampling.pipeline import load_pipeline
    pipe = load_pipeline(load_config(cfg), torch.device("cpu"))

    class Labeller:                       # a stand-in face labeller: alternating classes
        attributes = {"gender": ["female", "male"]}

        def predict(self, images):
            p = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).repeat(len(images), 1)[:len(images)]
            return {"gender": p}
    extract.extract_pseudo_labelled(pipe.sampler, [0, 1, 2, 3], Labeller(), h_dir,
                                    {"model": pipe.model_id, "config": "p2_small", "labeller": "test"}, 2,
                                    torch.device("cpu"))           # as main.py --extract_pseudo
    done = tmp_path / "dirs.pt"
    assert multi_classifier.main(["--directions_from", str(h_dir), "--adp", str(imported), "--out", str(done)]) == 0
    adp = ADP.load(done)
    assert adp.has_directions() and adp.meta["data_source"]["calibrated"] == ["gender"]
    assert main(["--config", cfg, "--adp", str(done), "--device", "cpu", "--mode", "distribution",
                 "--target", "gender=0.5", "--preset", "ours", "--no-check", "--n_test_img", "2",
                 "--bs_test", "2", "--exp", str(tmp_path / "ours")]) == 0
