"""``length_discount: attenuation``: a reward's lean on length brought to the gold's, without the gold.

Why a reward leans on length more than the preference it learned (docs/reward-models.md, "Why an
imperfect reward correlates with length more than the gold"): the best predictor of the gold from
features that carry the length, ``r = E[g | x]``, keeps the gold's whole covariance with the
length ``L`` but only part of its variance, so ``corr(r, L) = corr(g, L) / ρ`` with ``ρ = corr(r, g)``.
A reward of agreement 0.6 correlates with length 1.7 times as much as the gold does, and PPO pushes
along whatever the reward reads (Singhal et al. 2023, arXiv 2310.03716). Running the relation
backwards, ``corr(g, L) = ρ · corr(r, L)``: what the reward's length correlation should be, if ρ is
known.

ρ is estimated from the rankings alone when some pairs are ranked twice (two annotators a prompt):

1. the reward's *out-of-fold* scores (each candidate scored by the head fitted without its prompt),
   so that the agreement is not the fit's own;
2. over every (pair, ranking), the correlation of the score difference with the label (+1, 0 for a
   tie, −1): the reward's agreement with what the annotators *said*;
3. the labels' reliability, the correlation of two rankings' labels on the same pair;
4. Spearman's correction for attenuation (Spearman 1904): two labels of one pair are independent
   given what the annotators follow, so their correlation is the share of the labels' variance that
   is signal, and ``ρ = agreement / √reliability``.

The discount subtracts ``β`` times the length the features carry (a ridge fit of the response's
length in words, the length ``rlhf rm eval`` reports the lean against, on the standardised
features, so it folds into the linear head and the saved model is scored as before), β the least
with which ``corr(r, L)`` over the training answers' out-of-fold scores falls to ``ρ`` times its
own. Nothing is discounted when the reward does not correlate positively with length: the concern
is a reward that pays for length.

Measured (``experiments/benchmarks/bench_rm_heads.py --length_discount``, docs/reward-models.md):
the sign labels saturate, so ρ comes out below the truth (0.50 against 0.56 on VADER) and the
discount goes a little past the gold's lean rather than short of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BISECTION_STEPS = 60
# the ridge of the length's fit on the standardised features (per feature, on the mean-squared
# scale): 0.1 predicts the token count on held-out answers at correlation 0.95, 1e-3 at 0.90
LENGTH_RIDGE = 0.1


@dataclass
class LengthDiscount:
    """What the discount found: the labels' reliability, the reward's agreement with them, ρ, and the
    training answers' length correlation before and after (β per word of predicted length)."""

    reliability: float
    agreement: float
    rho: float
    corr_before: float
    corr_after: float
    beta: float
    shared_pairs: int


def pair_labels(rankings: list[list[int]]) -> dict[tuple[int, int], list[int]]:
    """Each pair ``(i, j)``, ``i < j``, of one prompt's candidates → every ranking's label on it: +1
    ``i`` above ``j``, −1 below, 0 tied. ``rankings``: tier indices per candidate (best 0, −1 absent)."""
    labels: dict[tuple[int, int], list[int]] = {}
    for tiers in rankings:
        ranked = [c for c, t in enumerate(tiers) if t >= 0]
        for n, i in enumerate(ranked):
            for j in ranked[n + 1 :]:
                labels.setdefault((i, j), []).append((tiers[j] > tiers[i]) - (tiers[j] < tiers[i]))
    return labels


def attenuation_corrected_agreement(
    rankings: list[list[list[int]]], scores: list[torch.Tensor]
) -> tuple[float, float, float, int]:
    """``(ρ, reliability, agreement, shared pairs)`` over prompts: ``rankings[p]`` every ranking of
    prompt ``p`` (tier indices), ``scores[p]`` its candidates' out-of-fold scores. ValueError when
    no pair is ranked twice, or the labels of twice-ranked pairs do not agree at all."""
    first, second, diffs, said = [], [], [], []
    for tiers, s in zip(rankings, scores):
        for (i, j), labels in pair_labels(tiers).items():
            if len(labels) >= 2:
                first.append(labels[0])
                second.append(labels[1])
            diffs += [float(s[i] - s[j])] * len(labels)
            said += labels
    if len(first) < 2:
        raise ValueError("no pair is ranked twice: two rankings of some prompts are needed")
    reliability = _corr(torch.tensor(first, dtype=torch.float64), torch.tensor(second, dtype=torch.float64))
    if not reliability > 0:
        raise ValueError(f"two rankings of one pair agree with correlation {reliability:.3f}: no signal")
    agreement = _corr(torch.tensor(diffs, dtype=torch.float64), torch.tensor(said, dtype=torch.float64))
    return min(max(agreement / math.sqrt(reliability), 0.0), 1.0), reliability, agreement, len(first)


def discount_for_correlation(
    scores: torch.Tensor, lengths: torch.Tensor, direction: torch.Tensor, factor: float
) -> tuple[float, float, float]:
    """``(β, corr before, corr after)``: the least β ≥ 0 with which ``corr(scores − β·direction,
    lengths)`` is ``factor`` times ``corr(scores, lengths)`` (β 0 when that is not positive).
    ``direction`` is the length itself, centred, or the part of it the features carry."""
    before = _corr(scores, lengths)
    if not before > 0 or factor >= 1:
        return 0.0, before, before
    target = before * max(factor, 0.0)
    low, high = 0.0, 1.0
    while _corr(scores - high * direction, lengths) > target:  # corr falls as β grows
        high *= 2
        if high > 1e12:
            raise ValueError("the length direction does not lower the correlation: nothing to discount")
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if _corr(scores - mid * direction, lengths) > target else (low, mid)
    return high, before, _corr(scores - high * direction, lengths)


def length_direction(z: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``v``: ``z @ v`` is the ridge fit of the (centred) length on the standardised features
    ``z [N, F]``: the length as the features carry it, which a linear head can subtract."""
    centred = lengths - lengths.mean()
    gram = z.T @ z / len(z) + LENGTH_RIDGE * torch.eye(z.shape[1], dtype=z.dtype)
    return torch.linalg.solve(gram, z.T @ centred / len(z))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])
