"""Metrics and judges: hand-computed answers on tiny inputs (CPU, no downloads)."""
import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from models.judge import OnnxJudge, TorchModuleJudge, load_judge
from utils.evaluation.metrics import (bootstrap_fd, class_fractions, confident_share, evaluate_attributes,
                           fairness_discrepancy, fid_inception, frechet_distance,
                           inception_features, joint_fairness_discrepancy, joint_labels,
                           joint_target)


# --- Fairness Discrepancy ------------------------------------------------------------------------
def test_fd_80_20_against_balanced():
    assert fairness_discrepancy([0.5, 0.5], [0.8, 0.2]) == pytest.approx(math.sqrt(0.18))
    assert math.sqrt(0.18) == pytest.approx(0.4243, abs=1e-4)


def test_fd_of_balanced_set_is_zero():
    p = class_fractions(np.array([0, 1, 1, 0, 1, 0]), 2)
    np.testing.assert_allclose(p, [0.5, 0.5])
    assert fairness_discrepancy([0.5, 0.5], p) == 0.0


def test_fd_three_classes_by_hand():
    # fractions (3/6, 2/6, 1/6) vs uniform: differences (1/6, 0, -1/6) -> sqrt(2)/6
    p = class_fractions(np.array([0, 0, 0, 1, 1, 2]), 3)
    np.testing.assert_allclose(p, [1 / 2, 1 / 3, 1 / 6])
    assert fairness_discrepancy(np.full(3, 1 / 3), p) == pytest.approx(math.sqrt(2) / 6)


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="classes"):
        fairness_discrepancy([0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        fairness_discrepancy([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_fractions(np.array([0, 2]), 2)


def test_joint_labels_and_target_2x2_by_hand():
    a, b = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 1])
    np.testing.assert_array_equal(joint_labels({"a": a, "b": b}, {"a": 2, "b": 2}), [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(joint_labels({"a": [1], "b": [2]}, {"a": 2, "b": 3}), [5])
    np.testing.assert_allclose(joint_target({"a": [0.5, 0.5], "b": [0.2, 0.8]}),
                               [0.1, 0.4, 0.1, 0.4])
    # joint fractions (.2, .2, .2, .4) vs .25 each -> sqrt(3 * .05^2 + .15^2) = sqrt(.03)
    fd = joint_fairness_discrepancy({"a": a, "b": b}, {"a": [0.5, 0.5], "b": [0.5, 0.5]})
    assert fd == pytest.approx(math.sqrt(0.03))


def test_joint_fd_sees_bias_that_marginals_miss():
    a = b = np.array([0, 0, 1, 1])            # marginals 50/50, joint only (0,0) and (1,1)
    assert fairness_discrepancy([0.5, 0.5], class_fractions(a, 2)) == 0.0
    half = {"a": [0.5, 0.5], "b": [0.5, 0.5]}
    assert joint_fairness_discrepancy({"a": a, "b": b}, half) == pytest.approx(0.5)


def test_bootstrap_ci_contains_estimate_and_narrows():
    small = np.array([0] * 80 + [1] * 20)
    fd, lo, hi = bootstrap_fd(small, [0.5, 0.5], 2, n_boot=2000, seed=0)
    assert fd == pytest.approx(math.sqrt(0.18)) and lo <= fd <= hi
    big = np.array([0] * 8000 + [1] * 2000)
    fd_big, lo_big, hi_big = bootstrap_fd(big, [0.5, 0.5], 2, n_boot=2000, seed=0)
    assert fd_big == pytest.approx(fd) and lo_big <= fd_big <= hi_big
    assert hi_big - lo_big < (hi - lo) / 5    # width ~ 1/sqrt(N): 10x more samples
    assert bootstrap_fd(small, [0.5, 0.5], 2, seed=3) == bootstrap_fd(small, [0.5, 0.5], 2, seed=3)


def test_confident_share_by_hand():
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]])
    assert confident_share(probs, 0.9) == 0.5       # 0.95 and 0.9 (>=) pass
    assert confident_share(torch.tensor(probs), 0.5) == 1.0


def test_evaluate_attributes():
    one_hot = lambda labels, k: np.eye(k)[labels]
    gender = one_hot(np.array([0, 0, 0, 1]), 2)
    age = one_hot(np.array([0, 1, 0, 1]), 2)
    res = evaluate_attributes({"gender": torch.tensor(gender), "age": age},
                              {"gender": [0.5, 0.5], "age": [0.5, 0.5]}, n_boot=200)
    g = res["attributes"]["gender"]
    assert g["fractions"] == [0.75, 0.25] and g["confident_share"] == 1.0
    assert g["fd"] == pytest.approx(math.sqrt(0.125)) and g["fd_ci"][0] <= g["fd_ci"][1]
    assert res["attributes"]["age"]["fd"] == 0.0
    # joint labels (0,0) (0,1) (0,0) (1,1) -> fractions (.5, .25, 0, .25) vs .25 each
    assert res["joint"]["fractions"] == [0.5, 0.25, 0.0, 0.25]
    assert res["joint"]["fd"] == pytest.approx(math.sqrt(0.125))
    json.dumps(res)                                   # JSON-ready
    plain = evaluate_attributes({"gender": gender, "age": age})
    assert "fd" not in plain["attributes"]["gender"] and "fd" not in plain["joint"]
    with pytest.raises(ValueError, match="no probabilities"):
        evaluate_attributes({"gender": gender}, {"smile": [0.5, 0.5]})


# --- Frechet distance --------------------------------------------------------------------------
def _exact_samples(n, mean, cov, seed):
    """n samples whose empirical mean and (unbiased) covariance are exactly mean and cov."""
    x = np.random.default_rng(seed).normal(size=(n, len(mean)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(x, rowvar=False)))).T  # cov = I
    return x @ np.linalg.cholesky(np.asarray(cov, dtype=float)).T + np.asarray(mean)


def test_frechet_1d_closed_form():
    a = _exact_samples(500, [1.0], [[4.0]], seed=0)          # mu 1, sigma 2
    b = _exact_samples(300, [-0.5], [[0.25]], seed=1)        # mu -0.5, sigma 0.5
    assert frechet_distance(a, b) == pytest.approx(1.5 ** 2 + (2 - 0.5) ** 2)


def test_frechet_2d_by_hand():
    a = _exact_samples(400, [0, 0], np.diag([4.0, 1.0]), seed=2)
    b = _exact_samples(400, [0, 0], np.diag([1.0, 9.0]), seed=3)
    assert frechet_distance(a, b) == pytest.approx(4 + 1 + 1 + 9 - 2 * (2 * 1 + 1 * 3))
    # S_a = 4 I, S_b = [[2, 1], [1, 2]] (eigenvalues 3, 1): Tr sqrt(S_a S_b) = 2 (sqrt 3 + 1)
    a = _exact_samples(400, [0, 0], 4 * np.eye(2), seed=4)
    b = _exact_samples(400, [1, 2], [[2.0, 1.0], [1.0, 2.0]], seed=5)
    assert frechet_distance(a, b) == pytest.approx(5 + 8 + 4 - 4 * (math.sqrt(3) + 1))


def test_frechet_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 16)) * np.arange(1, 17)
    assert abs(frechet_distance(feats, feats)) < 1e-6
    few = feats[:10]                                    # N < D: the low-rank (SVD) route
    assert abs(frechet_distance(few, few)) < 1e-6
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(feats, feats[:, :3])


def test_frechet_low_rank_route_matches_eigen_route():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(8, 3)), rng.normal(size=(6, 3)) * 2 + 1      # N > D: eigen route
    pad = lambda x: np.concatenate([x, np.zeros((len(x), 40))], axis=1)  # N <= D: SVD route
    assert frechet_distance(pad(a), pad(b)) == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_frechet_matches_scipy_sqrtm_formula():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    b = rng.normal(size=(250, 20)) * 1.5 + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)


# --- FID ------------------------------------------------------------------------------------------
def test_fid_missing_weights_says_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        fid_inception(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), tmp_path / "nope.pt")
    msg = str(err.value)
    assert "inception-2015-12-05.pt" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases" in msg and "Nothing is downloaded" in msg


def test_fid_pytorch_fid_weights_need_pytorch_fid(tmp_path, monkeypatch):
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({}, weights)
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)    # as if not installed
    with pytest.raises(ImportError, match="pip install pytorch-fid"):
        inception_features(torch.zeros(2, 3, 8, 8), weights)


def test_fid_pytorch_fid_route_reads_the_local_file(tmp_path, monkeypatch):
    """A stand-in pytorch_fid.inception whose only way to weights is a URL fetch we must replace."""
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"w": torch.tensor(3.0)}, weights)
    fake = types.ModuleType("pytorch_fid.inception")

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    class InceptionV3(nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            self.w = fake.load_state_dict_from_url("https://example.invalid/x.pth")["w"]

        def forward(self, x):                           # x in [0, 1]
            return [x.mean(dim=(2, 3), keepdim=True) * self.w]

    fake.load_state_dict_from_url, fake.InceptionV3 = no_download, InceptionV3
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", fake)
    sys.modules["pytorch_fid"].inception = fake
    feats = inception_features(torch.ones(2, 3, 8, 8), weights)
    np.testing.assert_allclose(feats, 3.0)              # white -> 1.0 in [0, 1], times w = 3
    assert fake.load_state_dict_from_url is no_download  # restored afterwards


class _FakeInception(nn.Module):
    """Stands in for the TorchScript Inception: features = per-channel mean, tiled to 2048."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2048, 1, bias=False)
        conv.weight.data = torch.eye(3).repeat(683, 1)[:2048].view(2048, 3, 1, 1)
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv)

    def forward(self, x):
        return self.layers(x)


def test_fid_torchscript_route_preprocessing(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_FakeInception()).save(str(path))
    images = torch.stack([-torch.ones(3, 16, 16), torch.ones(3, 16, 16), torch.zeros(3, 16, 16)])
    feats = inception_features(images, path, batch_size=2)
    assert feats.shape == (3, 2048)
    np.testing.assert_allclose(feats[0], -1.0, atol=1e-5)        # byte 0 -> (0 - 128) / 128
    np.testing.assert_allclose(feats[1], 127 / 128, atol=1e-5)   # byte 255 -> 127 / 128
    np.testing.assert_allclose(feats[2], 0.0, atol=1e-5)         # 127.5 rounds to byte 128
    grey = inception_features(torch.ones(2, 1, 12, 12), path)    # grey is repeated to RGB
    np.testing.assert_allclose(grey, 127 / 128, atol=1e-5)
    rand = torch.rand(6, 3, 20, 20) * 2 - 1
    assert abs(fid_inception(rand, rand, path)) < 1e-6


# --- Judges ----------------------------------------------------------------------------------------
def _tiny_classifier(in_features):
    lin = nn.Linear(in_features, 2)
    lin.weight.data = torch.tensor([[1.0] * in_features, [-1.0] * in_features]) / in_features
    lin.bias.data.zero_()
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)


def test_torch_module_judge_probabilities_by_hand():
    # grey module, mean 0 / std 1: logits (m, -m) with m = mean pixel in [0, 1] -> p0 = sigmoid(2m)
    judge = TorchModuleJudge(_tiny_classifier(1), "tone", ["light", "dark"], input_size=4,
                             mean=0.0, std=1.0, channels=1, feature_layer="1")
    rgb = torch.stack([torch.full((3, 8, 8), v) for v in (1.0, -1.0, 0.0)])
    p = judge.predict(rgb)["tone"]
    expected0 = torch.sigmoid(2 * torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(p[:, 0], expected0)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(judge.features(rgb), torch.tensor([[1.0], [0.0], [0.5]]))
    # RGB module fed grey images; default mean = std = 0.5 gives it [-1, 1] back: m = v
    judge3 = TorchModuleJudge(_tiny_classifier(3), "tone", ["light", "dark"], input_size=4)
    grey = torch.full((2, 1, 4, 4), 0.25)
    torch.testing.assert_close(judge3.predict(grey)["tone"][:, 0], torch.sigmoid(torch.full((2,), 0.5)))
    with pytest.raises(ValueError, match="expected"):
        TorchModuleJudge(_tiny_classifier(1), "tone", ["a", "b", "c"], 4, channels=1).predict(grey)


def _export(module, example, path):
    torch.onnx.export(module, (example,), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}},
                      dynamo=False)


def test_onnx_judge_round_trip(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(net, torch.randn(2, 3, 4, 4), tmp_path / "j.onnx")
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    expected = TorchModuleJudge(net, "a", ["x", "y"], input_size=4).predict(images)["a"]
    # graph input = (x01 * 1 - 0.5) * 2 = [-1, 1], as the torch judge's (x01 - .5) / .5
    onnx = OnnxJudge(tmp_path / "j.onnx", "a", ["x", "y"], input_size=4, value_max=1.0,
                     mean=0.5, scale=2.0, batch_size=2)
    torch.testing.assert_close(onnx.predict(images)["a"], expected, atol=1e-5, rtol=1e-5)
    sidecar = {"attribute": "a", "classes": ["x", "y"], "input_size": 4, "value_max": 1.0,
               "mean": [0.5, 0.5, 0.5], "scale": 2.0, "outputs": "logits"}
    (tmp_path / "j.json").write_text(json.dumps(sidecar))
    loaded = load_judge(str(tmp_path / "j.onnx"))
    assert loaded.attributes == {"a": ["x", "y"]}
    torch.testing.assert_close(loaded.predict(images)["a"], expected, atol=1e-5, rtol=1e-5)
    # NHWC graph: the exported module takes [N, H, W, C]
    nhwc = nn.Sequential(_Permute(), net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(nhwc, torch.randn(2, 4, 4, 3), tmp_path / "k.onnx")
    loaded = load_judge({"path": tmp_path / "k.onnx", **sidecar, "layout": "NHWC"})
    torch.testing.assert_close(loaded.predict(images)["a"], expected, atol=1e-5, rtol=1e-5)
    (tmp_path / "j.json").write_text(json.dumps({**sidecar, "colour": "rgb"}))
    with pytest.raises(ValueError, match="colour"):
        load_judge(tmp_path / "j.onnx")
    with pytest.raises(ValueError, match="sidecar"):
        load_judge(tmp_path / "k.onnx")


class _Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def test_load_judge_dispatches_torch_checkpoints(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_judge(tmp_path / "missing.pt")
    torch.save({"kind": "mystery_net", "state_dict": {}}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="mystery_net"):
        load_judge(tmp_path / "m.pt")
    torch.save({"kind": "digits_cnn"}, tmp_path / "d.pt")
    fake = types.ModuleType("models.digits_judge")
    fake.DigitsJudge = types.SimpleNamespace(load=lambda path: ("loaded", path))
    monkeypatch.setitem(sys.modules, "models.digits_judge", fake)
    assert load_judge(str(tmp_path / "d.pt")) == ("loaded", tmp_path / "d.pt")
    (tmp_path / "x.h5").write_text("")
    with pytest.raises(ValueError, match="unknown judge file type"):
        load_judge(tmp_path / "x.h5")


# ---- preservation of what was not targeted ------------------------------------------------------
def test_expected_untargeted_keeps_each_cells_own_mix():
    from utils.evaluation.metrics import expected_untargeted, preservation_drift
    # vanilla: parity cell 0 (even) has magnitude low 3 of 4, cell 1 (odd) low 1 of 2
    cells = np.array([0, 0, 0, 0, 1, 1])
    mag = np.array([0, 0, 0, 1, 0, 1])
    want = expected_untargeted(cells, mag, [0.5, 0.5], 2)
    assert want.tolist() == pytest.approx([0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5])   # 0.625 / 0.375
    same = preservation_drift(cells, mag, [0.5, 0.5], np.array([0] * 5 + [1] * 3), 2, n_boot=200)
    assert same["drift"] == pytest.approx(0.0) and same["observed"] == pytest.approx([0.625, 0.375])
    moved = preservation_drift(cells, mag, [0.5, 0.5], np.array([0, 1] * 4), 2, n_boot=200)
    assert moved["drift"] == pytest.approx(np.hypot(0.125, 0.125))
    assert moved["drift_ci"][0] <= moved["drift_ci"][1]
    assert expected_untargeted(cells, mag, [0.5, 0.0, 0.5], 2) is None     # a target cell vanilla never drew
