"""Intervals for the lab's figures: every number the lab reports as evidence comes with one.

- :func:`bootstrap_ci`: a percentile bootstrap over independent units (prompts), for any
  statistic of per-unit values — pair accuracies, win rates, mean score differences;
- :func:`win_rate_ci`: the paired win rate of one policy over another (ties count ½) with its
  bootstrap interval, over prompts;
- :func:`mean_diff_ci`, :func:`welch_ci`: the difference of two independent means (e.g. the last
  quarter of a learning curve's rollouts minus its first quarter's) with Welch's t interval, from
  the values or from each side's mean, variance and size.

The bootstrap resamples *prompts*, not pairs or tokens: the responses to one prompt are not
independent of each other, so the prompt is the unit (Efron & Tibshirani 1993, ch. 13).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % interval ``[low, high]`` over ``n`` units."""

    value: float
    low: float
    high: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self, key: str) -> dict[str, float]:
        """``{key: value, key_ci_low: low, key_ci_high: high}`` for metrics and summaries."""
        return {key: self.value, f"{key}_ci_low": self.low, f"{key}_ci_high": self.high}


def bootstrap_ci(
    units: Sequence,
    statistic: Callable[[Sequence], float],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """``statistic(units)`` and its percentile-bootstrap interval, resampling whole ``units``.

    ``units`` is any sequence (one entry per prompt); ``statistic`` maps a resampled list of units
    to a float. Resamples whose statistic is NaN (e.g. no pairs drawn) are skipped.
    """
    units = list(units)
    value = float(statistic(units))
    if len(units) < 2:
        return Estimate(value, float("nan"), float("nan"), len(units))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(units), len(units))
        v = float(statistic([units[i] for i in idx]))
        if not math.isnan(v):
            draws.append(v)
    if not draws:
        return Estimate(value, float("nan"), float("nan"), len(units))
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), len(units))


def mean_bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of per-unit ``values`` with its bootstrap interval (vectorised: fast for any n;
    ``n_resamples=0``: the mean alone)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2 or n_resamples <= 0:
        v = float(x.mean()) if x.size else float("nan")
        return Estimate(v, float("nan"), float("nan"), int(x.size))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))


def win_rate_ci(
    scores: Sequence[float], baseline: Sequence[float], n_resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Fraction of prompts where ``scores`` beats ``baseline`` (ties count ½), paired by prompt,
    with its bootstrap interval over prompts."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate_ci: {a.shape[0]} scores but {b.shape[0]} baseline scores")
    wins = (a > b) + 0.5 * (a == b)
    return mean_bootstrap_ci(wins, n_resamples, seed)


def mean_diff_ci(after: Sequence[float], before: Sequence[float]) -> Estimate:
    """``mean(after) - mean(before)`` of two independent samples with Welch's 95 % interval
    (:func:`welch_ci`)."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return Estimate(float("nan"), float("nan"), float("nan"), int(a.size + b.size))
    return welch_ci(a.mean(), a.var(ddof=1), a.size, b.mean(), b.var(ddof=1), b.size)


def welch_ci(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int) -> Estimate:
    """``mean_a - mean_b`` of two independent samples, given each one's mean, sample variance
    (``ddof=1``) and size, with Welch's 95 % interval: Student's t at the Welch–Satterthwaite
    degrees of freedom (Welch 1947). With few values a side the normal quantile would not do: with
    three a side, ``mean ± 1.96 · se`` covered the true difference in only 88 % of simulated normal
    samples, the t interval in 96 %."""
    diff = float(mean_a - mean_b)
    n = int(n_a + n_b)
    if n_a < 2 or n_b < 2:
        return Estimate(float("nan"), float("nan"), float("nan"), n)
    se_a, se_b = var_a / n_a, var_b / n_b
    se = math.sqrt(se_a + se_b)
    if se == 0:
        return Estimate(diff, diff, diff, n)
    dof = (se_a + se_b) ** 2 / (se_a**2 / (n_a - 1) + se_b**2 / (n_b - 1))
    half = float(student_t.ppf(0.975, dof)) * se
    return Estimate(diff, diff - half, diff + half, n)
