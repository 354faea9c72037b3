"""models/pixel_classifier.py and utils/baselines/pixel_guidance.py: the guided eps on a hand-built
classifier (known gradients, both variants, both modes), scale 0 == vanilla bit for bit,
checkpoints round trip and refuse mismatches.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.adp import ClassifierMismatchError
from models.pixel_classifier import NoisyPixelClassifier, PixelClassifierConfig
from utils.sampling.diffusion import DDIMSampler, Schedule
from utils.sampling.pipeline import Pipeline, plan_batches, sample_batches
from utils.baselines.pixel_guidance import DEFAULT_SCALES, PixelGuidance, pixel_guidance_factory
from utils.sampling.seeds import SeededNoise

SHAPE = (1, 16, 16)
SCHEDULE = Schedule.from_config({})          # linear 1e-4 .. 0.02, T = 1000
T = 500
A_T = SCHEDULE.alpha_bar(T)


class HandClassifier(nn.Module):
    """One binary attribute with logit_1 - logit_0 = k * sum(x); records the t it was given."""

    attributes = {"a": ["c0", "c1"]}

    def __init__(self, k: float = 0.01):
        super().__init__()
        self.k, self.seen_t = k, None

    def forward(self, x, t):
        self.seen_t = t
        z = self.k * x.flatten(1).sum(1)
        return {"a": torch.stack([torch.zeros_like(z), z], dim=1)}


class LinearEps(nn.Module):
    """A stand-in U-Net with eps = c * x_t."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return self.c * x


def _x(n=3, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _guide(mode, targets, scale=2.0, variant="xt", clf=None, net=None):
    return PixelGuidance(net, clf or HandClassifier(), SCHEDULE, mode,
                         {"a": torch.as_tensor(targets)}, {"a": scale}, variant)


def test_sample_mode_xt_known_gradient():
    """d/dx log sigma(z) = (1 - sigma(z)) k for class 1, -sigma(z) k for class 0."""
    x, eps, s, k = _x(), torch.zeros(3, *SHAPE), 2.0, 0.01
    sig = torch.sigmoid(k * x.flatten(1).sum(1))
    got = _guide("sample", [1, 0, 1], s)(x, eps, 7, T)
    grad = torch.stack([(1 - sig[0]) * k, -sig[1] * k, (1 - sig[2]) * k])
    want = -math.sqrt(1 - A_T) * s * grad.view(3, 1, 1, 1).expand(3, *SHAPE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # towards class 1 means a larger predicted x0 = (x - sqrt(1-a) eps) / sqrt(a)
    assert (got[0] < 0).all() and (got[1] > 0).all()


def test_distribution_mode_known_gradient_and_batch_size_free():
    """chi2 to [.5,.5]: dL/dm = 8 (m - 1/2), m = mean sigma; grad_n log p = -8 s (m - 1/2) sigma'(z_n) k."""
    x, s, k = _x(4, seed=1) + 0.5, 3.0, 0.01
    sig = torch.sigmoid(k * x.flatten(1).sum(1))
    m = sig.mean()
    got = _guide("distribution", [0.5, 0.5], s)(x, torch.zeros_like(x), 0, T)
    grad = -8 * s * (m - 0.5) * sig * (1 - sig) * k
    torch.testing.assert_close(got, (-math.sqrt(1 - A_T) * grad).view(4, 1, 1, 1).expand_as(x),
                               rtol=1e-5, atol=1e-8)
    assert m > 0.5 and (got > 0).all()          # too many class 1: push x0 down
    twice = _guide("distribution", [0.5, 0.5], s)(torch.cat([x, x]), torch.zeros(8, *SHAPE), 0, T)
    torch.testing.assert_close(twice[:4], got)  # the N factor cancels the batch mean


def test_x0_variant_known_gradient_through_the_network():
    """eps = c x: x0_hat = x (1 - sqrt(1-a) c) / sqrt(a); the classifier sees x0_hat at t = 0."""
    c, s, k = 0.5, 2.0, 0.01
    clf, x = HandClassifier(k), _x()
    got = _guide("sample", [1, 1, 1], s, "x0", clf, LinearEps(c))(x, torch.zeros_like(x), 3, T)
    r = (1 - math.sqrt(1 - A_T) * c) / math.sqrt(A_T)
    sig = torch.sigmoid(k * r * x.flatten(1).sum(1))
    want = -math.sqrt(1 - A_T) * s * ((1 - sig) * k * r).view(3, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert clf.seen_t.tolist() == [0, 0, 0]


def test_guide_works_under_no_grad_and_leaves_inputs_alone():
    x, eps = _x(), torch.ones(3, *SHAPE)
    with torch.no_grad():
        out = _guide("sample", [1, 1, 1], 1.0, "x0", net=LinearEps(0.3))(x, eps, 0, T)
    assert not out.requires_grad and not x.requires_grad
    assert torch.equal(eps, torch.ones(3, *SHAPE)) and not torch.equal(out, eps)


def _tiny_clf(width=8):
    torch.manual_seed(1)
    return NoisyPixelClassifier(PixelClassifierConfig(width=width, emb_dim=16, hidden=16)).eval()


def _run(net, make_guide, seeds=(3, 4), eta=1.0, steps=4):
    pipe = Pipeline(net, DDIMSampler(net, SCHEDULE, steps, eta=eta), {}, SHAPE, torch.device("cpu"))
    (_, im, dist), = list(sample_batches(pipe, plan_batches(list(seeds), 8), make_guide,
                                         progress=False))
    return pipe, im, dist


@pytest.mark.parametrize("variant", ["xt", "x0"])
def test_scale_zero_is_vanilla_bit_for_bit(tiny_adm, variant):
    clf = _tiny_clf()
    noise = SeededNoise([3, 4], SHAPE)
    plain, _ = DDIMSampler(tiny_adm, SCHEDULE, 4, eta=1.0).sample(noise.x_T(), noise.step)
    pipe, im0, _ = _run(tiny_adm, None)
    make = pixel_guidance_factory(pipe, clf, "distribution", {"parity": [0.5, 0.5]}, 0.0, variant)
    noise = SeededNoise([3, 4], SHAPE)
    zero, _ = pipe.sampler.sample(noise.x_T(), noise.step, **make.start([3, 4]).hooks())
    assert torch.equal(zero, plain)
    _, im1, dist = _run(tiny_adm, make)
    assert (im1 == im0).all() and dist == {}          # scale 0 never runs the classifier


def test_guided_sampling_changes_images_and_reports_distribution(tiny_adm):
    clf = _tiny_clf()
    pipe, im0, _ = _run(tiny_adm, None)
    make = pixel_guidance_factory(pipe, clf, "sample", {"digit": 7}, 50.0, "x0")
    _, im1, dist = _run(tiny_adm, make)
    assert (im1 != im0).any()
    assert len(dist["digit"]) == 10 and sum(dist["digit"]) == pytest.approx(1, abs=1e-5)


def test_factory_expands_classes_and_rejects_bad_requests(tiny_adm):
    clf = _tiny_clf()
    pipe = SimpleNamespace(net=tiny_adm, sampler=DDIMSampler(tiny_adm, SCHEDULE, 2, eta=0.0))
    g = pixel_guidance_factory(pipe, clf, "sample", {"parity": 1}, 1.0).start([5, 6, 7])
    assert g.targets["parity"].tolist() == [1, 1, 1]
    g = pixel_guidance_factory(pipe, clf, "distribution", {"parity": [0.5, 0.5]}, None, "x0").start([5])
    assert g.scales == {"parity": DEFAULT_SCALES["x0"]}
    with pytest.raises(ValueError, match="no measured default scale"):
        pixel_guidance_factory(pipe, clf, "sample", {"parity": 1}, None)
    with pytest.raises(ValueError, match="no head for 'gender'"):
        pixel_guidance_factory(pipe, clf, "sample", {"gender": 1}, 1.0)
    with pytest.raises(ValueError, match="summing to 1"):
        pixel_guidance_factory(pipe, clf, "distribution", {"parity": [0.7, 0.7]}, 1.0)
    with pytest.raises(ValueError, match=r"in 0\.\.1"):
        pixel_guidance_factory(pipe, clf, "sample", {"parity": 2}, 1.0)
    with pytest.raises(ValueError, match="variant"):
        pixel_guidance_factory(pipe, clf, "sample", {"parity": 1}, 1.0, "h")


def test_classifier_heads_and_per_sample_independence():
    clf, x = _tiny_clf(), _x(4)
    t = torch.tensor([0, 10, 500, 999])
    out = clf(x, t)
    assert {a: tuple(v.shape) for a, v in out.items()} == {"parity": (4, 2), "magnitude": (4, 2), "digit": (4, 10)}
    alone = clf(x[2:3], t[2:3])
    torch.testing.assert_close(alone["digit"], out["digit"][2:3], rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    clf, x, t = _tiny_clf(), _x(2), torch.tensor([5, 900])
    path = tmp_path / "clf.pt"
    clf.save(path, {"beta_schedule": "linear"}, {"data": "test"}, {"acc": 1.0}, "cmd")
    back = NoisyPixelClassifier.load(path, expect_diffusion={"beta_schedule": "linear", "beta_end": 0.02})
    assert torch.equal(back(x, t)["digit"], clf(x, t)["digit"])
    assert back.attributes == clf.attributes and back.meta["metrics"] == {"acc": 1.0}

    with pytest.raises(ClassifierMismatchError, match="schedule"):
        NoisyPixelClassifier.load(path, expect_diffusion={"beta_schedule": "cosine"})
    ck = torch.load(path, weights_only=True)
    ck["state_dict"]["heads.extra.weight"] = ck["state_dict"].pop("heads.digit.weight")
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(ClassifierMismatchError, match=r"missing key\(s\) \(first: \['heads.digit.weight'\]\).*heads.extra.weight"):
        NoisyPixelClassifier.load(tmp_path / "bad.pt")
    torch.save({"kind": "digits_cnn", "state_dict": {}}, tmp_path / "judge.pt")
    with pytest.raises(ClassifierMismatchError, match="not a pixel classifier checkpoint.*digits_cnn"):
        NoisyPixelClassifier.load(tmp_path / "judge.pt")
    with pytest.raises(FileNotFoundError, match="train_pixel_classifier"):
        NoisyPixelClassifier.load(tmp_path / "none.pt")
