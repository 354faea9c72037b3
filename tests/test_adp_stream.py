"""utils/data/adp_train.py reading extraction shards from disk: the same ADP as from memory.

CPU only, tiny data: h of shape 4x2x2 (D = 16) at 5 steps, N = 100 samples with a class-dependent
mean shift (linearly separable), written in the extraction format as 3 shards (40 + 40 + 20) or
as one. Peak memory is measured by bench/adp_memory.py, not here.
"""
import copy

import pytest
import torch

import multi_classifier
from models.adp import ADP
from utils.data import extract
from utils.data.adp_train import chunks, mean_std, split_indices, train_adp, train_adp_stream
from utils.data.extract import _save_shard, _write_meta, load_h_dataset, open_h_dataset

N, S, H_SHAPE = 100, 5, (4, 2, 2)
D = 16
TIMESTEPS = [800, 600, 400, 200, 0]
ATTRS = {"odd": ["even", "odd"], "tri": ["t0", "t1", "t2"]}
OPTS = {"epochs": 30, "lr": 1e-2, "batch_size": 16, "seed": 3}


def _toy(seed=0):
    """h [N,S,C,H,W]: noise 0.3 + 3 * (+-1 on coordinate 0 for 'odd', +1 on coordinate 1+c for 'tri')."""
    g = torch.Generator().manual_seed(seed)
    y = {"odd": torch.randint(0, 2, (N,), generator=g), "tri": torch.randint(0, 3, (N,), generator=g)}
    h = 0.3 * torch.randn(N, S, D, generator=g)
    h[:, :, 0] += 3.0 * (2 * y["odd"][:, None] - 1)
    h[torch.arange(N), :, 1 + y["tri"]] += 3.0
    return h.reshape(N, S, *H_SHAPE).half(), y


def _write(folder, h, labels, shard_size, attributes=ATTRS):
    _write_meta(folder, {"model": {"config": "toy"}, "h_shape": list(H_SHAPE), "timesteps": TIMESTEPS,
                         "source": "pseudo", "attributes": attributes, "shard_size": shard_size, "n": len(h)})
    for k, i in enumerate(range(0, len(h), shard_size)):
        _save_shard(folder, k, {"h": h[i:i + shard_size], "ids": list(range(i, min(i + shard_size, len(h)))),
                                "labels": {a: v[i:i + shard_size] for a, v in labels.items()}})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("h")
    h, y = _toy()
    return _write(root / "three", h, y, 40), _write(root / "one", h, y, N)


@pytest.fixture(scope="module")
def in_memory(folders):
    """(meta, h [N,S,D] float16, labels) and the ADP trained on them in memory."""
    meta, h, labels = load_h_dataset([folders[0]])
    return meta, h, labels, train_adp(h, labels, meta, **OPTS)


def _assert_same_adp(a: ADP, b: ADP, exact: bool):
    for k, v in a.state_dict().items():
        if exact:
            assert torch.equal(v, b.state_dict()[k]), k
        else:
            torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)


def test_shards_are_indexed_without_reading_h_and_read_back_exactly(folders):
    data = open_h_dataset([folders[0]])
    h, y = _toy()
    assert data.sizes == [40, 40, 20] and len(data) == N and list(data.labels) == ["odd", "tri"]
    assert all(torch.equal(data.labels[a], y[a]) for a in ATTRS)
    rows = torch.tensor([7, 0, 39, 7])
    assert torch.equal(data.read(1, rows), h[40 + rows].reshape(4, S, D))
    head = data.head(50)
    assert head.sizes == [40, 10] and len(head.labels["tri"]) == 50


def test_streamed_mean_std_equal_the_in_memory_ones(folders, in_memory):
    _, h, _, _ = in_memory
    tr, _ = split_indices(N, 0.2, 3)
    mean, std = mean_std(open_h_dataset([folders[0]]), tr, rows=7)        # 3 shards, chunks of 7 rows
    torch.testing.assert_close(mean, h[tr].double().mean(0).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, h[tr].double().std(0).float(), rtol=1e-6, atol=1e-6)


def test_one_shard_from_disk_gives_the_in_memory_adp_exactly(folders, in_memory):
    meta, _, _, (adp_mem, metrics_mem) = in_memory
    adp, metrics = train_adp_stream(open_h_dataset([folders[1]]), meta, **OPTS)
    _assert_same_adp(adp, adp_mem, exact=True)
    assert metrics == metrics_mem and adp.class_prior == adp_mem.class_prior


def test_three_shards_train_the_same_heads_as_memory(folders, in_memory):
    """The shuffle is over all training samples whatever the shards, so only the float64
    statistics' chunking differs: same heads to rounding, same (perfect) validation accuracy."""
    meta, _, _, (adp_mem, metrics_mem) = in_memory
    adp, metrics = train_adp_stream(open_h_dataset([folders[0]]), meta, **OPTS)
    _assert_same_adp(adp, adp_mem, exact=False)
    for a in ATTRS:
        assert metrics["attributes"][a]["val_accuracy_per_step"] == [1.0] * S, a
        assert metrics["attributes"][a] == metrics_mem["attributes"][a]


def test_streamed_directions_and_confusion_equal_in_memory_ones_for_the_same_weights(folders, in_memory):
    meta, h, labels, _ = in_memory
    data = open_h_dataset([folders[0]])
    streamed, _ = train_adp_stream(data, meta, **OPTS)
    tr, va = split_indices(N, 0.2, OPTS["seed"])
    ref = copy.deepcopy(streamed)
    ref.compute_directions(h[tr])
    ref.calibrate(h[va], {a: v[va] for a, v in labels.items()})
    small = copy.deepcopy(streamed)                                   # chunks of 7 rows, not one a shard
    assert small.directions_from_chunks(x for _, x in chunks(data, tr, 7)) == len(tr)
    small.calibrate_from_chunks((x, {a: v[g] for a, v in labels.items()}) for g, x in chunks(data, va, 7))
    for a, classes in ATTRS.items():
        for other in (streamed, small):
            torch.testing.assert_close(getattr(other, f"dir_{a}"), getattr(ref, f"dir_{a}"), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(getattr(other, f"conf_{a}"), getattr(ref, f"conf_{a}"), rtol=1e-6, atol=1e-6)
        probs = torch.softmax(ref.logits_all_steps(h[va], a), -1)                   # M_s[:, c], by hand
        for c in range(len(classes)):
            torch.testing.assert_close(ref.confusion(a, 2)[:, c], probs[labels[a][va] == c, 2].mean(0))


def test_micro_batches_add_up_to_the_batch(in_memory):
    """Micro-batches of 3 rows (a budget of 3 h-vectors) train the heads of whole batches."""
    meta, h, labels, (adp_whole, _) = in_memory
    adp, _ = train_adp(h, labels, meta, **OPTS, chunk_elems=3 * S * D)
    _assert_same_adp(adp, adp_whole, exact=False)


def test_multi_classifier_trains_from_disk_with_limit(folders, in_memory, tmp_path, monkeypatch):
    meta, h, labels, _ = in_memory

    def refuse(*_a, **_k):
        raise AssertionError("training loaded every h into memory")
    monkeypatch.setattr(multi_classifier, "load_h_dataset", refuse)
    monkeypatch.setattr(extract, "load_h_dataset", refuse)
    out = tmp_path / "adp.pt"
    assert multi_classifier.main(["--data", str(folders[0]), "--out", str(out), "--limit", "80",
                                  "--epochs", "30", "--lr", "0.01", "--batch_size", "16", "--seed", "3"]) == 0
    adp = ADP.load(out)
    assert adp.meta["data_source"]["n"] == 80 and adp.meta["metrics"]["n_train"] + adp.meta["metrics"]["n_val"] == 80
    want, _ = train_adp(h[:80], {a: v[:80] for a, v in labels.items()}, meta, **OPTS)
    _assert_same_adp(adp, want, exact=False)


def test_inconsistent_shards_are_refused_naming_the_file(folders, tmp_path):
    h, y = _toy()
    only_odd = _write(tmp_path / "odd", h[:10], {"odd": y["odd"][:10]}, 10, {"odd": ATTRS["odd"]})
    with pytest.raises(ValueError, match="'tri' is labelled in .*shard_00000.pt but not in .*odd"):
        open_h_dataset([folders[0], only_odd])
    assert len(open_h_dataset([folders[0], only_odd], ["odd"])) == N + 10
    bad = _write(tmp_path / "bad", h[:10], {"odd": y["odd"][:10]}, 10, {"odd": ATTRS["odd"]})
    _save_shard(bad, 1, {"h": h[:4, :3], "ids": [0, 1, 2, 3], "labels": {"odd": y["odd"][:4]}})
    with pytest.raises(ValueError, match=r"shard_00001.pt: h is \(4, 3, 4, 2, 2\).*\[n, 5, 4, 2, 2\]"):
        open_h_dataset([bad])


def test_each_prompts_class_fractions_are_kept_and_refine_within_them(tmp_path):
    """Shards of two prompts (text-to-image extraction): the ADP keeps each prompt's class
    fractions beside the pooled ones, saves them, and a plan for a prompt refines within its own."""
    from utils.guidance import build_plan
    h, y = _toy()
    folder = tmp_path / "h"
    _write_meta(folder, {"model": {"config": "toy"}, "h_shape": list(H_SHAPE), "timesteps": TIMESTEPS,
                         "source": "pseudo", "attributes": ATTRS, "shard_size": 50, "n": N})
    y["tri"][:50] = torch.tensor([0] * 40 + [1] * 10)           # prompt "small": t0 80%, t1 20%
    y["tri"][50:] = 2                                            # prompt "large": t2 only
    y["odd"] = (y["tri"] == 1).long()                            # odd iff t1
    for k, q in enumerate(["small", "large"]):
        _save_shard(folder, k, {"h": h[50 * k:50 * (k + 1)], "ids": list(range(50 * k, 50 * (k + 1))),
                                "prompt": q, "labels": {a: v[50 * k:50 * (k + 1)] for a, v in y.items()}})
    data = open_h_dataset([folder])
    assert data.prompts == ["small"] * 50 + ["large"] * 50 and data.head(60).prompts[-1] == "large"
    adp, _ = train_adp_stream(data, data.meta, **dict(OPTS, epochs=1))
    assert adp.prompt_prior["small"]["tri"] == pytest.approx([0.8, 0.2, 0.0])
    assert adp.prompt_prior["large"]["tri"] == pytest.approx([0.0, 0.0, 1.0])
    assert adp.class_prior["tri"] == pytest.approx([0.4, 0.1, 0.5])
    path = tmp_path / "adp.pt"
    adp.save(path, {"config": "toy"}, {}, {})
    back = ADP.load(path)
    assert back.prompt_prior == adp.prompt_prior and back.priors("unknown prompt") == adp.class_prior
    cfg = {"model": {"family": "sd"}, "guidance": {"preset": "ours"},
           "refine": {"odd": {"via": "tri", "groups": [[0, 2], [1]]}}}
    plans = {q: build_plan(cfg, "distribution", {"odd": "0.5"}, adp.attributes, {}, None, back.priors(q))
             for q in ("small", None)}
    # even half over t0 and t2 in the prompt's own proportions (0.8 : 0): all on t0
    assert plans["small"].targets["tri"].tolist() == pytest.approx([0.5, 0.5, 0.0], abs=2e-3)
    assert plans[None].targets["tri"].tolist() == pytest.approx([0.5 * 0.4 / 0.9, 0.5, 0.5 * 0.5 / 0.9], abs=2e-3)
