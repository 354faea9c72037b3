"""models/adp.py and utils/data/adp_train.py: training on a separable toy h-space, checkpoints, directions.

CPU only, tiny data: h [N=200, S=3, D=16] with a class-dependent mean shift, so a linear head per
step must reach 100% validation accuracy.
"""
import pytest
import torch

from models.adp import ADP, ClassifierMismatchError
from utils.data.adp_train import train_adp

N, S, D = 200, 3, 16
TIMESTEPS = [20, 10, 0]
ATTRS = {"odd": ["even", "odd"], "quad": ["q0", "q1", "q2", "q3"]}
MODEL_ID = {"config": "toy", "checkpoint": "toy.pt", "checkpoint_sha256": "a" * 64}


def _toy_data(seed=0):
    """h [N,S,D]: noise 0.3 + 4 * (+-1 on coordinate 0 for 'odd', +1 on coordinate 1+q for 'quad')."""
    g = torch.Generator().manual_seed(seed)
    y_odd = torch.randint(0, 2, (N,), generator=g)
    y_quad = torch.randint(0, 4, (N,), generator=g)
    h = 0.3 * torch.randn(N, S, D, generator=g)
    h[:, :, 0] += 4.0 * (2 * y_odd[:, None] - 1)
    h[torch.arange(N), :, 1 + y_quad] += 4.0
    return h, {"odd": y_odd, "quad": y_quad}


@pytest.fixture(scope="module")
def trained():
    h, labels = _toy_data()
    meta = {"attributes": ATTRS, "h_shape": [D, 1, 1], "timesteps": TIMESTEPS}
    # AdamW moves every coordinate at about the same rate early on, so the 15 pure-noise
    # coordinates need ~100 steps (2 batches an epoch here) to fall behind the signal.
    adp, metrics = train_adp(h, labels, meta, epochs=60, lr=1e-2, seed=0)
    return adp, metrics, h, labels


def test_train_adp_separable_toy_reaches_full_accuracy_at_every_step(trained):
    adp, metrics, _, _ = trained
    assert set(adp.attributes) == {"odd", "quad"}
    for a in ATTRS:
        accs = metrics["attributes"][a]["val_accuracy_per_step"]
        assert accs == [1.0] * S, (a, accs)
        assert metrics["attributes"][a]["val_accuracy_last_20pct"] == 1.0


def test_train_adp_metrics_structure(trained):
    adp, metrics, _, labels = trained
    assert metrics["n_train"] + metrics["n_val"] == N
    assert metrics["n_val"] == 40                       # val_fraction 0.2
    for a, classes in ATTRS.items():
        m = metrics["attributes"][a]
        assert len(m["val_accuracy_per_step"]) == S
        assert all(0.0 <= v <= 1.0 for v in m["val_accuracy_per_step"])
        assert m["class_counts"] == torch.bincount(labels[a], minlength=len(classes)).tolist()
        assert sum(m["class_counts"]) == N
    assert adp.weight["quad"].shape == (S, 4, D)
    assert adp.direction("odd", 0).shape == (2, D)


def test_save_load_round_trip_gives_identical_logits(trained, tmp_path):
    adp, metrics, h, _ = trained
    path = tmp_path / "adp.pt"
    adp.save(path, MODEL_ID, {"source": "toy"}, metrics)
    back = ADP.load(path, expect_model=MODEL_ID, expect_h_shape=(D, 1, 1))
    assert back.timesteps == TIMESTEPS and back.attributes == ATTRS and back.h_shape == (D, 1, 1)
    assert back.meta["model"] == MODEL_ID and back.meta["metrics"] == metrics
    hb = h[:10, 1].reshape(10, D, 1, 1)
    for t in TIMESTEPS:
        a, b = adp.logits(hb, t), back.logits(hb, t)
        for k in ATTRS:
            assert torch.equal(a[k], b[k])
    for k in ATTRS:
        assert torch.equal(adp.direction(k, 2), back.direction(k, 2))
    # the model's class fractions: the training labels' frequencies, kept by the checkpoint
    _, _, _, labels = trained
    for k, classes in ATTRS.items():
        want = torch.bincount(labels[k], minlength=len(classes)).double() / len(labels[k])
        assert back.class_prior[k] == pytest.approx(want.tolist())


def test_load_refuses_other_h_shape_naming_both(trained, tmp_path):
    adp, metrics, _, _ = trained
    path = tmp_path / "adp.pt"
    adp.save(path, MODEL_ID, {}, metrics)
    with pytest.raises(ClassifierMismatchError) as e:
        ADP.load(path, expect_h_shape=(8, 2, 1))
    assert "(16, 1, 1)" in str(e.value) and "(8, 2, 1)" in str(e.value)


def test_load_refuses_other_model_checkpoint(trained, tmp_path):
    adp, metrics, _, _ = trained
    path = tmp_path / "adp.pt"
    adp.save(path, MODEL_ID, {}, metrics)
    other = {**MODEL_ID, "checkpoint_sha256": "b" * 64}
    with pytest.raises(ClassifierMismatchError, match="must match its model"):
        ADP.load(path, expect_model=other)


def test_step_index_off_grid_and_missing_file(trained, tmp_path):
    adp = trained[0]
    assert adp.step_index(10) == 1
    with pytest.raises(ClassifierMismatchError, match="timestep 5"):
        adp.step_index(5)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ADP.load(tmp_path / "nope.pt")


def test_compute_directions_is_covariance_times_raw_weight():
    torch.manual_seed(1)
    n, d = 23, 3
    adp = ADP((d, 1, 1), [1, 0], {"a": ["x", "y"], "b": ["p", "q", "r"]})
    h = torch.randn(n, 2, d) * torch.tensor([1.0, 3.0, 0.5]) + 2.0
    with torch.no_grad():
        adp.mean.copy_(h.mean(0))                       # the exact mean, as torch.cov uses
        adp.std.copy_(torch.rand(2, d) + 0.5)
        for p in adp.weight.values():
            p.copy_(torch.randn_like(p))
    adp.compute_directions(h, batch=7)                  # several chunks
    for s in range(2):
        cov = torch.cov(h[:, s].T)                      # [D, D], unbiased (n - 1)
        for a in ("a", "b"):
            w_raw = adp.weight[a][s] / adp.std[s]       # [K, D]
            expected = (cov @ w_raw.T).T
            torch.testing.assert_close(adp.direction(a, s), expected, rtol=1e-5, atol=1e-5)


def test_an_adp_folder_round_trips_with_identical_logits(tmp_path):
    """config.json + model.safetensors + README.md: the same logits, priors and metadata as the
    .pt file of the same ADP."""
    torch.manual_seed(0)
    adp = ADP((4, 2, 2), [10, 0], {"gender": ["female", "male"], "age": ["young", "mid", "old"]})
    with torch.no_grad():
        for buf in (adp.mean, adp.std, *adp.weight.values(), *adp.bias.values()):
            buf.copy_(torch.randn_like(buf).abs() + 0.1)
    adp.class_prior = {"gender": [0.7, 0.3], "age": [0.2, 0.5, 0.3]}
    model = {"config": "tiny", "checkpoint": "x", "checkpoint_sha256": "ab" * 32, "h_module": "mid_block"}
    metrics = {"attributes": {"gender": {"val_accuracy_per_step": [0.9, 0.8], "val_accuracy_first_10pct": 0.9,
                                         "val_accuracy_last_20pct": 0.8}}}
    adp.save(tmp_path / "adp.pt", model, {"source": "pseudo", "n": 5, "labeller": "clip"}, metrics)
    adp.save(tmp_path / "adp", model, {"source": "pseudo", "n": 5, "labeller": "clip"}, metrics)
    assert sorted(p.name for p in (tmp_path / "adp").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    a, b = ADP.load(tmp_path / "adp.pt"), ADP.load(tmp_path / "adp", {"checkpoint_sha256": "ab" * 32})
    h = torch.randn(3, 4, 2, 2)
    for s in range(2):
        la, lb = a.logits_at(h, s), b.logits_at(h, s)
        assert all(torch.equal(la[k], lb[k]) for k in la)
    assert b.class_prior == a.class_prior and b.meta == a.meta and b.timesteps == [10, 0]
    card = (tmp_path / "adp" / "README.md").read_text()
    assert "0.700, 0.300" in card and "0.900 / 0.800" in card and "module `mid_block`" in card
    with pytest.raises(ClassifierMismatchError, match="another model|sha256"):
        ADP.load(tmp_path / "adp", {"checkpoint_sha256": "cd" * 32})
    (tmp_path / "adp" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ClassifierMismatchError, match="cannot be read"):
        ADP.load(tmp_path / "adp")


def test_an_adp_folder_loads_from_a_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    """``ADP.load("org/name")``: the snapshot of a cached hub repository, offline."""
    import huggingface_hub.constants
    torch.manual_seed(1)
    adp = ADP((2, 1, 1), [5, 0], {"a": ["x", "y"]})
    commit = "0" * 40
    snapshot = tmp_path / "models--someone--digits-adp" / "snapshots" / commit
    adp.save(snapshot, {"config": "c"}, {"source": "pseudo"}, {})
    (tmp_path / "models--someone--digits-adp" / "refs").mkdir()
    (tmp_path / "models--someone--digits-adp" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ADP.load("someone/digits-adp")
    assert torch.equal(loaded.state_dict()["mean"], adp.state_dict()["mean"]) and loaded.timesteps == [5, 0]
    with pytest.raises(FileNotFoundError, match="cached hub id"):
        ADP.load("someone/not-cached")


# ---- the model identity (models.files.model_identity) ------------------------------------------
def test_model_identity_keys():
    from models.files import model_identity
    assert model_identity("c", "m.pt", "a" * 64) == {"config": "c", "checkpoint": "m.pt", "checkpoint_sha256": "a" * 64}
    assert model_identity("c", "m", None, family="sd", h_module="mid_block", h_pool=None) == {
        "config": "c", "checkpoint": "m", "checkpoint_sha256": None, "family": "sd", "h_module": "mid_block",
        "h_pool": None}


@pytest.mark.parametrize("config, adp", [("configs/digits16.yml", "pretrained/digits16_adp.pt"),
                                         ("configs/digits16_t2i.yml", "pretrained/digits16_t2i_adp.pt"),
                                         ("configs/digits16_dit.yml", "pretrained/digits16_dit_adp")])
def test_the_loaders_identity_is_the_one_the_shipped_adps_record(config, adp):
    from models.files import resolve_path
    from utils.app.config import load_config
    from utils.config import RunConfig
    from utils.sampling.pipeline import load_adp_for, load_pipeline
    from utils.sampling.text2image import load_t2i
    cfg = load_config(resolve_path(config))
    load = load_t2i if RunConfig.of(cfg).text_to_image else load_pipeline
    pipe = load(cfg, torch.device("cpu"))
    recorded = ADP.load(resolve_path(adp)).meta["model"]
    assert {k: pipe.model_id[k] for k in recorded} == recorded
    load_adp_for(pipe, adp)                                  # and the load's own check passes
