"""bench/downstream.py: the balancing arithmetic, the ceiling's real top-up and worst-class accuracy."""
import numpy as np
import pytest

from bench.downstream import (balancing_fractions, class_accuracies, real_topup, split_counts,
                              target_spec)
from models.digits import load_split
from utils.guidance.targets import parse_fraction_vector


def test_balancing_the_ddpm_subset_makes_digits_uniform_and_parity_50_50():
    split = load_split()
    counts = np.bincount(split.train_y, minlength=10)
    n_add, fr = balancing_fractions(counts)
    assert n_add == 530 and fr.sum() == pytest.approx(1.0)
    total = counts + split_counts(n_add, fr)
    assert (total == total[0]).all()                                  # uniform over digits
    even = total[0::2].sum() / total.sum()
    assert even == pytest.approx(0.5)                                 # and 50/50 parity
    assert fr[0::2].sum() == pytest.approx(0.2)                       # the added set is 20% even
    # the ceiling's real top-up has the same counts, from real digits outside the subset
    top = real_topup(split.judge_y, split_counts(n_add, fr))
    assert (np.bincount(split.judge_y[top], minlength=10) == split_counts(n_add, fr)).all()
    assert len(set(split.judge_index[top]) & set(split.train_index)) == 0
    # the target string main.py gets parses back to these fractions (zeros smoothed by 1e-3)
    vec = parse_fraction_vector("digit", target_spec(fr).split("=")[1], [str(d) for d in range(10)])
    assert np.allclose(vec.numpy(), fr, atol=2e-3)


def test_uniform_counts_are_refused():
    with pytest.raises(ValueError, match="already uniform"):
        balancing_fractions(np.array([3, 3, 3]))


def test_split_counts_sums_exactly():
    assert split_counts(7, np.array([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]   # 3.5, 1.75, 1.75
    assert split_counts(10, np.array([1 / 3] * 3)).sum() == 10


def test_worst_class_accuracy_is_the_lowest_recall():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])       # recalls 0.75, 0.5, 1.0
    overall, worst, per = class_accuracies(pred, y, 3)
    assert overall == pytest.approx(6 / 8) and worst == pytest.approx(0.5)
    assert per.tolist() == [0.75, 0.5, 1.0]
