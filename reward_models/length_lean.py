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
- ``length_corr_beyond``: the reward's length correlation minus the one its agreement with the gold
  explains, ``corr(g, L) / corr(r, g)``. Why that is the fair reference: the best prediction of
  the gold from features that carry the length, ``r = E[g | x]``, has ``cov(r, L) = cov(g, L)``
  and ``var(r) = cov(r, g)``, so ``corr(r, L) = corr(g, L) / corr(r, g)``: *every* reward that
  captures less of the gold than the gold itself, but its length part fully, correlates with length
  more than the gold does, by the factor ``1 / corr(r, g)``. Only a lean beyond that is the
  reward's own (``eval/length_corr_explained`` is the reference, ``eval/gold_corr`` the
  agreement). NaN where the premise cannot hold: the reward does not agree with the gold, or agrees
  with it less than the length alone does (a gold that is mostly length, learned partly).

The per-prompt units are sums (moments for the correlation, counts for the share), so a resample of
prompts is a sum of rows: the pooled statistic, not an average of per-prompt ones.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf.stats import bootstrap_ci


def _sums_by_prompt(valid: torch.Tensor, *variables: torch.Tensor) -> np.ndarray:
    """Each prompt's n, then the sums of every variable, of its square, and of every product of two
    (in the order (0, 1), (0, 2), ..., (1, 2), ...), over its valid responses (all ``[G, K]``)."""
    v = [torch.where(valid, t.double(), 0.0) for t in variables]
    products = [v[i] * v[j] for i in range(len(v)) for j in range(i + 1, len(v))]
    cols = (valid.double(), *v, *(x * x for x in v), *products)
    return torch.stack([c.sum(1) for c in cols], dim=1).numpy()


def moments_by_prompt(scores: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """``[G, 6]``: each prompt's n, Σscore, Σlength, Σscore², Σlength², Σscore·length over its
    valid responses (``scores``, ``lengths``, ``valid``: ``[G, K]``)."""
    return _sums_by_prompt(valid, scores, lengths)


def pearson_from_moments(m: np.ndarray) -> float:
    """Pearson correlation of the pooled responses whose moments are the rows of ``m`` (NaN when
    either variable is constant)."""
    n, sx, sy, sxx, syy, sxy = m.sum(0)
    cov = sxy - sx * sy / n
    var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
    if var_x <= 1e-12 * max(sxx, 1.0) or var_y <= 1e-12 * max(syy, 1.0):
        return float("nan")
    return float(cov / np.sqrt(var_x * var_y))


def joint_moments_by_prompt(
    scores: torch.Tensor, gold: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor
) -> np.ndarray:
    """``[G, 10]``: each prompt's n, then the sums of r, g, L, r², g², L², rg, rL, gL over its valid
    responses (r the scores, g the gold, L the lengths; all ``[G, K]``)."""
    return _sums_by_prompt(valid, scores, gold, lengths)


def _pair_moments(m: np.ndarray, a: int, b: int, ab: int) -> np.ndarray:
    """The 6-column moments of variables ``a`` and ``b`` (1-based columns of the joint moments
    after n) for :func:`pearson_from_moments`."""
    return m[:, [0, a, b, a + 3, b + 3, ab]]


def gold_corr(m: np.ndarray) -> float:
    """Pearson correlation of the reward with the gold, from joint moments."""
    return pearson_from_moments(_pair_moments(m, 1, 2, 7))


def reward_length_corr(m: np.ndarray) -> float:
    """Pearson correlation of the reward with the length, from joint moments."""
    return pearson_from_moments(_pair_moments(m, 1, 3, 8))


def gold_length_corr(m: np.ndarray) -> float:
    """Pearson correlation of the gold with the length, from joint moments."""
    return pearson_from_moments(_pair_moments(m, 2, 3, 9))


def length_corr_explained(m: np.ndarray) -> float:
    """``corr(g, L) / corr(r, g)``: the length correlation of the best predictor of the gold that
    agrees with it as much as the reward does. NaN where no such predictor exists: when the reward
    does not agree with the gold, or agrees with it less than the length alone does (|corr(g, L)| >
    corr(r, g): a reward that carried the length whole would agree at least that much)."""
    agreement, own = gold_corr(m), gold_length_corr(m)
    if not agreement > 0 or abs(own) > agreement:
        return float("nan")
    return own / agreement


def length_corr_beyond(m: np.ndarray) -> float:
    """The reward's length correlation minus :func:`length_corr_explained`."""
    return reward_length_corr(m) - length_corr_explained(m)


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
    gold ``[G, K]`` the gold's own (``eval/gold_...``), the model's excess over it
    (``eval/..._excess``) and the correlation beyond what the model's agreement with the gold
    explains (``eval/length_corr_beyond``, module docstring). Pairs the gold separates by no more
    than ``gold_threshold`` are ties to it."""
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
    if gold is not None:
        joint = joint_moments_by_prompt(scores, gold, lengths, valid)
        for name, statistic in (
            ("gold_corr", gold_corr),
            ("length_corr_explained", length_corr_explained),
            ("length_corr_beyond", length_corr_beyond),
        ):
            out.update(_estimate(joint, statistic, seed).as_dict(f"eval/{name}"))
    return out


def _difference(statistic, width: int):
    """The statistic of the first ``width`` columns minus that of the rest (model − gold)."""
    return lambda rows: statistic(rows[:, :width]) - statistic(rows[:, width:])


def _estimate(units: np.ndarray, statistic, seed: int):
    """The statistic of the prompts' rows and its bootstrap interval over prompts."""
    return bootstrap_ci(list(units), lambda rows: statistic(np.asarray(rows)), seed=seed)
