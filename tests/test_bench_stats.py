"""The numpy statistics behind bench.compare, against values worked out by hand or from tables."""
import numpy as np
import pytest

from bench import stats
from bench.stats import (
    average_ranks,
    bootstrap_interval,
    bootstrap_relative_change,
    holm,
    mann_whitney,
    median_of_rows,
    u_distribution,
)


def test_ties_share_the_mean_of_their_ranks():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_the_exact_null_of_u_counts_every_ordering():
    # 3 + 3 values: C(6, 3) = 20 orderings, U from 0 to 9, symmetric.
    assert u_distribution(3, 3).tolist() == [1, 1, 2, 3, 3, 3, 3, 2, 1, 1]


def test_completely_separated_small_samples_give_the_exact_two_sided_p():
    test = mann_whitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert test.exact and test.u == 0
    assert test.p_value == pytest.approx(2 / 252)


def test_the_normal_approximation_agrees_with_the_exact_test_on_moderate_samples(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, 20), rng.normal(0.6, 1, 20)
    exact = mann_whitney(x, y)
    monkeypatch.setattr(stats, "EXACT_MAX_PAIRS", 0)
    approx = mann_whitney(x, y)
    assert exact.exact and not approx.exact
    assert approx.p_value == pytest.approx(exact.p_value, rel=0.1)


def test_identical_samples_are_not_different():
    assert mann_whitney([2.0] * 10, [2.0] * 10).p_value == 1.0


def test_holm_multiplies_the_smallest_p_by_the_family_size_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_bootstrap_interval_of_a_median_covers_it_and_is_reproducible():
    data = np.random.default_rng(1).normal(10, 1, 200)
    low, high = bootstrap_interval(data, median_of_rows, seed=5)
    assert low < np.median(data) < high and high - low < 0.6
    assert (low, high) == bootstrap_interval(data, median_of_rows, seed=5)


def test_bootstrap_interval_of_a_relative_change_brackets_a_planted_30_percent_drop():
    rng = np.random.default_rng(2)
    before = rng.lognormal(0, 0.1, 64)
    low, high = bootstrap_relative_change(before, before * 0.7, median_of_rows)
    assert low < -0.3 + 1e-9 < high or low <= -0.3 <= high
    assert high < -0.2
