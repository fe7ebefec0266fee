"""How much a reward leans on response length, against how much the gold does, with intervals.

A reward model that learned length instead of the preference is the classic failure of RLHF
reward models (Singhal et al. 2023, "A Long Way to Go", arXiv 2310.03716): PPO then writes longer
answers and the reward rises without the preference. Two measures, each for the model and for the
gold scorer on the same held-out responses, each with a 95 % bootstrap interval over prompts, and
the model's excess over the gold (model − gold, resampling the same prompts for both):

- ``length_corr``: Pearson correlation of the score with the response's length in words, over
  every held-out response. It mixes two things: how scores differ *between* prompts (which a
  ranking loss never trains: only differences within a prompt enter it) and within one.
- ``longer_preferred``: of the pairs of answers *to one prompt* that differ in length and that the
  scores order, the share in which the longer answer scores higher (0.5: length plays no part).
  This is the lean a ranking loss learns and PPO's comparisons reward.

The per-prompt units are sums (moments for the correlation, counts for the share), so a resample of
prompts is a sum of rows: the pooled statistic, not an average of per-prompt ones.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf.stats import bootstrap_ci


def moments_by_prompt(scores: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """``[G, 6]``: each prompt's n, Σscore, Σlength, Σscore², Σlength², Σscore·length over its
    valid responses (``scores``, ``lengths``, ``valid``: ``[G, K]``)."""
    x = torch.where(valid, scores.double(), 0.0)
    y = torch.where(valid, lengths.double(), 0.0)
    cols = (valid.double(), x, y, x * x, y * y, x * y)
    return torch.stack([c.sum(1) for c in cols], dim=1).numpy()


def pearson_from_moments(m: np.ndarray) -> float:
    """Pearson correlation of the pooled responses whose moments are the rows of ``m`` (NaN when
    either variable is constant)."""
    n, sx, sy, sxx, syy, sxy = m.sum(0)
    cov = sxy - sx * sy / n
    var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
    if var_x <= 1e-12 * max(sxx, 1.0) or var_y <= 1e-12 * max(syy, 1.0):
        return float("nan")
    return float(cov / np.sqrt(var_x * var_y))


def longer_preferred_by_prompt(
    scores: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, threshold: float = 0.0
) -> np.ndarray:
    """``[G, 2]``: each prompt's (pairs whose longer answer scores higher by more than
    ``threshold``, pairs of different lengths whose scores differ by more than ``threshold``)."""
    d = scores.double()[:, :, None] - scores.double()[:, None, :]
    longer = (lengths[:, :, None] > lengths[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    separated = longer & (d.abs() > threshold)
    longer_wins = longer & (d > threshold)
    return torch.stack([longer_wins.sum((1, 2)), separated.sum((1, 2))], dim=1).double().numpy()


def share(units: np.ndarray) -> float:
    """Σ first column / Σ second column (NaN without pairs)."""
    right, total = units.sum(0)
    return float(right / total) if total else float("nan")


def length_lean_metrics(
    scores: torch.Tensor,
    gold: torch.Tensor | None,
    lengths: torch.Tensor,
    valid: torch.Tensor,
    gold_threshold: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """``eval/length_corr`` and ``eval/longer_preferred`` of the model (with intervals), and with a
    gold ``[G, K]`` the gold's own (``eval/gold_...``) and the model's excess over it
    (``eval/..._excess``). Pairs the gold separates by no more than ``gold_threshold`` are ties to it."""
    out: dict[str, float] = {}
    for name, units_of, statistic, gold_kwargs in (
        ("length_corr", moments_by_prompt, pearson_from_moments, {}),
        ("longer_preferred", longer_preferred_by_prompt, share, {"threshold": gold_threshold}),
    ):
        model_units = units_of(scores, lengths, valid)
        out.update(_estimate(model_units, statistic, seed).as_dict(f"eval/{name}"))
        if gold is None:
            continue
        gold_units = units_of(gold, lengths, valid, **gold_kwargs)
        out.update(_estimate(gold_units, statistic, seed).as_dict(f"eval/gold_{name}"))
        both = np.concatenate([model_units, gold_units], axis=1)
        excess = _difference(statistic, model_units.shape[1])
        out.update(_estimate(both, excess, seed).as_dict(f"eval/{name}_excess"))
    return out


def _difference(statistic, width: int):
    """The statistic of the first ``width`` columns minus that of the rest (model − gold)."""
    return lambda rows: statistic(rows[:, :width]) - statistic(rows[:, width:])


def _estimate(units: np.ndarray, statistic, seed: int):
    """The statistic of the prompts' rows and its bootstrap interval over prompts."""
    return bootstrap_ci(list(units), lambda rows: statistic(np.asarray(rows)), seed=seed)
