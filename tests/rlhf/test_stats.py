"""Intervals: hand-computed values, and the properties every interval must have."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.stats import Estimate, bootstrap_ci, mean_bootstrap_ci, mean_diff_ci, welch_ci, win_rate_ci


def test_win_rate_counts_ties_as_half_and_brackets_its_value():
    est = win_rate_ci([1, 2, 3, 4], [0, 2, 5, 1])  # win, tie, loss, win
    assert est.value == pytest.approx(0.625) and est.n == 4
    assert 0 <= est.low <= est.value <= est.high <= 1


def test_win_rate_interval_shrinks_with_more_prompts_and_is_seeded():
    few = win_rate_ci([1, 0] * 10, [0, 1] * 10)
    many = win_rate_ci([1, 0] * 500, [0, 1] * 500)
    assert few.value == many.value == 0.5
    assert (many.high - many.low) < (few.high - few.low) / 3
    assert win_rate_ci([1, 0, 1], [0, 0, 0], seed=3) == win_rate_ci([1, 0, 1], [0, 0, 0], seed=3)
    with pytest.raises(ValueError):
        win_rate_ci([1, 2], [1])


def test_mean_diff_is_welch_by_hand():
    # one side constant: se = sqrt(var 1 / 3), and Welch–Satterthwaite gives 2 degrees of freedom
    est = mean_diff_ci([1, 2, 3], [0, 0, 0])
    half = 4.302652729911275 * math.sqrt(1 / 3)  # t(0.975, 2)
    assert est.value == pytest.approx(2.0)
    assert (est.low, est.high) == pytest.approx((2 - half, 2 + half))
    # equal variances 1/3 a side: se = sqrt(2/3), (2/3)² / (2 · (1/3)² / 2) = 4 degrees of freedom
    est = mean_diff_ci([1, 2, 3], [0, 1, 2])
    half = 2.7764451051977987 * math.sqrt(2 / 3)  # t(0.975, 4)
    assert (est.value, est.low, est.high) == pytest.approx((1.0, 1 - half, 1 + half))
    assert mean_diff_ci([2, 2], [1, 1]) == Estimate(1.0, 1.0, 1.0, 4)  # no spread: no width
    assert math.isnan(mean_diff_ci([1], [2]).value)


def test_welch_from_moments_is_welch_from_values():
    after, before = np.array([0.3, 1.9, 1.1, 0.7, 2.2]), np.array([0.1, -0.4, 0.8])
    from_moments = welch_ci(after.mean(), after.var(ddof=1), 5, before.mean(), before.var(ddof=1), 3)
    assert from_moments == mean_diff_ci(after, before)
    assert math.isnan(welch_ci(1.0, 0.0, 1, 0.0, 1.0, 4).low)  # one value a side has no variance


def test_mean_diff_interval_covers_95_percent_with_three_values_a_side():
    # A learning curve's quarters hold three updates each: the normal quantile's interval covered
    # the true difference (0 here) in about 88 % of such samples; Welch's t interval must reach 95 %.
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(4000, 2, 3))
    intervals = [mean_diff_ci(after, before) for after, before in draws]
    assert np.mean([est.low <= 0 <= est.high for est in intervals]) >= 0.94


def test_bootstrap_of_a_ratio_of_sums_resamples_whole_units():
    units = [(3.0, 4.0), (1.0, 4.0), (4.0, 4.0)]  # 8 of 12 right
    est = bootstrap_ci(units, lambda u: sum(a for a, _ in u) / sum(b for _, b in u))
    assert est.value == pytest.approx(8 / 12)
    assert 0.25 <= est.low <= est.value <= est.high <= 1.0
    # every resample is a mean of unit accuracies 0.25, 0.75, 1.0: the bounds are among them
    assert mean_bootstrap_ci([0.0, 1.0, 1.0, 1.0]).value == 0.75
    assert math.isnan(bootstrap_ci([(1.0, 1.0)], lambda u: 1.0).low)
