"""models/digits.py: the seeded, deliberately biased split of scikit-learn's digits."""
import numpy as np
import pytest
import torch

from models.digits import ATTRIBUTES, BIAS, SPLIT_SEED, attribute_labels, load_split, \
    to_model_images

N_DIGITS = 1797          # sklearn.datasets.load_digits


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits()


PARTS = ("train", "judge", "heldout")


def _part(split, name):
    return (getattr(split, f"{name}_x"), getattr(split, f"{name}_y"),
            getattr(split, f"{name}_index"))


def test_parts_are_disjoint_and_cover_the_data(split):
    """No image of the DDPM's training subset is in the judge's or the held-out part."""
    idx = {name: set(_part(split, name)[2].tolist()) for name in PARTS}
    assert not idx["train"] & idx["judge"]
    assert not idx["train"] & idx["heldout"]
    assert not idx["judge"] & idx["heldout"]
    assert sum(len(v) for v in idx.values()) == N_DIGITS
    assert set.union(*idx.values()) == set(range(N_DIGITS))


def test_parts_hold_the_images_and_labels_of_their_indices(split, digits):
    for name in PARTS:
        x, y, index = _part(split, name)
        assert len(x) == len(y) == len(index) > 0
        np.testing.assert_array_equal(y, digits.target[index])
        torch.testing.assert_close(x, to_model_images(digits.images[index]), rtol=0, atol=0)
        assert set(y.tolist()) == set(range(10)), f"{name} lacks a digit"


def test_images_shape_and_range(split):
    for name in PARTS:
        x = _part(split, name)[0]
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 16, 16)
        assert x.min() >= -1 and x.max() <= 1
        assert x.min() == -1 and x.max() == 1         # the range is used, not just bounded


def test_training_fractions_are_biased_as_declared(split):
    lab = attribute_labels(split.train_y)
    even, low = lab["parity"] == 0, lab["magnitude"] == 0
    assert even.mean() == pytest.approx(0.80, abs=1e-12)
    assert 0.68 <= low.mean() <= 0.72
    # the joint is BIAS's, not the product of the marginals (the attributes are correlated)
    assert (even & low).mean() == pytest.approx(BIAS[("even", "low")], abs=0.01)
    assert abs((even & low).mean() - even.mean() * low.mean()) > 0.02


def test_metadata_matches_the_arrays(split):
    meta = split.metadata()
    assert meta["split_seed"] == SPLIT_SEED and meta["image_size"] == 16
    assert (meta["n_train"], meta["n_judge"], meta["n_heldout"]) == \
        (len(split.train_y), len(split.judge_y), len(split.heldout_y))
    lab = attribute_labels(split.train_y)
    for attr, names in ATTRIBUTES.items():
        for k, cls in enumerate(names):
            assert meta["train_fractions"][attr][cls] == pytest.approx(np.mean(lab[attr] == k))
        assert sum(meta["train_fractions"][attr].values()) == pytest.approx(1.0)
    joint = meta["train_joint_parity_magnitude"]
    for (p, m) in BIAS:
        i, j = ATTRIBUTES["parity"].index(p), ATTRIBUTES["magnitude"].index(m)
        assert joint[f"{p}/{m}"] == pytest.approx(
            np.mean((lab["parity"] == i) & (lab["magnitude"] == j)))


def test_split_is_reproducible(split):
    again = load_split()
    for name in PARTS:
        x, y, index = _part(split, name)
        x2, y2, index2 = _part(again, name)
        np.testing.assert_array_equal(index, index2)
        np.testing.assert_array_equal(y, y2)
        assert torch.equal(x, x2)


def test_the_digits_judge_and_labeller_read_rgb_digits_as_their_grey_original():
    """A text-to-image pipeline gives grey digits repeated to RGB: same answers as the grey image."""
    from models.digits import load_split
    from models.digits_judge import DigitsJudge, SVCLabeller
    x = load_split().heldout_x[:20]
    for clf in (DigitsJudge.load("pretrained/digits16_judge.pt"), SVCLabeller()):
        a, b = clf.predict(x), clf.predict(x.repeat(1, 3, 1, 1))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_uniform_prior_labeller_divides_out_its_training_subsets_digit_prior():
    """digits_svc_uniform: the SVM's probabilities times 1 / (training count of the digit),
    renormalised. The training subset is 80% even, so on the judge's real digits (30% even) the
    SVM as fitted reads more even than there are, and the reweighted one fewer than it."""
    import numpy as np
    from models.digits import load_split
    from models.labellers import load_labeller
    split = load_split()
    counts = torch.bincount(torch.as_tensor(split.train_y), minlength=10).float()
    assert counts[[0, 2, 4, 6, 8]].sum() > 3 * counts[[1, 3, 5, 7, 9]].sum()   # the bias corrected for
    train, uniform = load_labeller("digits_svc"), load_labeller("digits_svc_uniform")
    a, b = train.predict(split.judge_x), uniform.predict(split.judge_x)
    expected = a["digit"] / counts
    torch.testing.assert_close(b["digit"], expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(b["parity"].sum(1), torch.ones(len(split.judge_x)))
    even_true = float(np.mean(split.judge_y % 2 == 0))
    even = [float(p["parity"].argmax(1).eq(0).float().mean()) for p in (a, b)]
    assert even[0] > even_true > even[1], (even, even_true)


def test_divide_prior_turns_the_cnns_softmax_into_the_label_shift_corrected_one():
    """divide_prior: softmax(logits - log pi) = p pi^-1 renormalised, for any input; counts that
    are not 10 positive numbers are refused."""
    from models.digits_judge import DigitsCNN, divide_prior
    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    counts = torch.tensor([106., 26, 106, 26, 106, 18, 53, 18, 53, 18])
    with torch.no_grad():
        before = torch.softmax(net(x)[0], 1)
        after = torch.softmax(divide_prior(net, counts)(x)[0], 1)
    expected = before / counts
    torch.testing.assert_close(after, expected / expected.sum(1, keepdim=True))
    assert not torch.allclose(after, before, atol=1e-3)
    for bad in (torch.ones(9), torch.tensor([0.] + [1.] * 9)):
        with pytest.raises(ValueError, match="10 positive digit counts"):
            divide_prior(DigitsCNN(), bad)


def test_the_shipped_cnn_labeller_is_trained_on_the_ddpms_subset_with_its_prior_divided_out():
    """pretrained/digits16_cnn_labeller.pt (the transformer default's check labeller): the
    judge's network trained on the DDPM's training subset, never the judge's part, with that
    subset's digit counts divided out; it reads held-out real digits as well as the judge."""
    from models.digits_judge import DigitsJudge
    from models.files import resolve_path
    split = load_split()
    lab = DigitsJudge.load(resolve_path("pretrained/digits16_cnn_labeller.pt"))
    counts = torch.bincount(torch.as_tensor(split.train_y), minlength=10)
    assert (lab.meta["split"], lab.meta["prior"]) == ("train", "uniform")
    assert lab.meta["train_digit_counts"] == counts.tolist()
    acc = float((lab.predict(split.heldout_x)["digit"].argmax(1).numpy() == split.heldout_y).mean())
    assert acc >= 0.97, acc
    import yaml
    assert yaml.safe_load(resolve_path("configs/digits16_dit.yml").read_text())["labeller"] == \
        "pretrained/digits16_cnn_labeller.pt"


def test_train_judge_refuses_to_write_a_labeller_over_the_judge(capsys):
    """--split train without --out would replace the judge with a labeller: refused (exit 2,
    the judge file untouched) before any training."""
    import importlib.util
    from models.files import resolve_path
    spec = importlib.util.spec_from_file_location("train_judge", resolve_path("scripts/train_judge.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    judge = resolve_path("pretrained/digits16_judge.pt")
    before = judge.read_bytes()
    with pytest.raises(SystemExit) as e:
        mod.main(["--split", "train", "--steps", "1"])
    assert e.value.code == 2 and "makes a labeller: give --out" in capsys.readouterr().err
    assert judge.read_bytes() == before
