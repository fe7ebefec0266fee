"""PPO's training score gain (``rlhf.ppo.metrics.score_gain``): the last quarter of the updates'
rollouts against the first quarter's, with Welch's interval over rollouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.ppo.metrics import score_gain
from rlhf.stats import mean_diff_ci


def _history(scores: np.ndarray) -> list[dict]:
    """One entry per update, as the loop logs them: the mean and the spread (divisor n) of the
    update's rollout scores."""
    return [{"objective/scores": float(s.mean()), "objective/scores_std": float(s.std())} for s in scores]


def test_the_gain_pools_the_quarters_rollouts_by_hand():
    # 8 updates of 2 rollouts: the quarters are updates 1–2 and 7–8
    scores = np.array([[0, 2], [1, 1], [5, 5], [5, 5], [5, 5], [5, 5], [2, 4], [3, 3]], dtype=float)
    gain = score_gain(_history(scores), episodes_per_update=2)
    # rollouts 0, 2, 1, 1 (mean 1, sample variance 2/3) against 2, 4, 3, 3 (mean 3, variance 2/3):
    # se = sqrt(2 · (2/3) / 4), 6 degrees of freedom
    half = 2.4469118511449786 * math.sqrt(1 / 3)  # t(0.975, 6)
    assert gain["ppo/score_gain"] == pytest.approx(2.0)
    assert (gain["ppo/score_gain_ci_low"], gain["ppo/score_gain_ci_high"]) == pytest.approx(
        (2 - half, 2 + half)
    )
    assert (gain["ppo/score_first_quarter"], gain["ppo/score_last_quarter"]) == (1.0, 3.0)
    # the same as Welch's interval over the rollouts themselves
    rollouts = mean_diff_ci(scores[-2:].ravel(), scores[:2].ravel())
    assert gain["ppo/score_gain_ci_low"] == pytest.approx(rollouts.low)


def test_a_history_without_the_spread_falls_back_to_the_updates_means():
    means = [0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 2.5]
    gain = score_gain([{"objective/scores": m} for m in means], episodes_per_update=32)
    expected = mean_diff_ci(means[-2:], means[:2])
    assert (gain["ppo/score_gain_ci_low"], gain["ppo/score_gain_ci_high"]) == (expected.low, expected.high)
    assert score_gain([{"objective/scores": 1.0}] * 7, episodes_per_update=32) == {}  # fewer than 8


def test_without_learning_the_interval_covers_zero_95_percent_of_the_time():
    # A policy that does not change: every rollout is a draw of the same distribution (skewed, as
    # reward-model scores can be). 15 updates of 32 rollouts, as the quickstart runs.
    rng = np.random.default_rng(0)
    runs = rng.gamma(2.0, 1.0, size=(2000, 15, 32))
    gains = [score_gain(_history(run), episodes_per_update=32) for run in runs]
    covered = [g["ppo/score_gain_ci_low"] <= 0 <= g["ppo/score_gain_ci_high"] for g in gains]
    assert 0.935 <= np.mean(covered) <= 0.965


def test_a_steady_rise_is_found_where_the_updates_means_miss_it():
    # the score climbs by 0.7 standard deviations of a rollout over 15 updates of 32 rollouts
    rng = np.random.default_rng(1)
    runs = rng.normal(size=(200, 15, 32)) + np.linspace(0, 0.7, 15)[None, :, None]
    by_rollouts = [score_gain(_history(run), 32)["ppo/score_gain_ci_low"] > 0 for run in runs]
    by_updates = [mean_diff_ci(run[-3:].mean(1), run[:3].mean(1)).low > 0 for run in runs]
    assert np.mean(by_rollouts) >= 0.95
    assert np.mean(by_updates) < 0.85
