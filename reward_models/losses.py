"""Ranking losses for reward models: pure torch functions over a padded group representation.

One batch element is one ranking of one prompt's K candidates:

- ``rewards`` ``[B, K]`` float: the reward model's score of every candidate;
- ``tiers``   ``[B, K]`` long: the tier index of every candidate in the ranking, 0 = best tier,
  1 = next, ...; ``-1`` marks padding (a group with fewer than K candidates) or a candidate the
  annotator did not rank. Candidates in the same tier are tied.

From ``tiers`` every unordered pair ``{i, j}`` of valid candidates is either *strict* (different
tiers: the lower tier index wins) or a *tie* (same tier). ``C > B = D > A`` over A..D has 5 strict
pairs and 1 tie (docs/rankings.md).

Every loss returns ``(loss [B], valid [B] bool)``: the per-group negative log-likelihood and
whether the group carries any evidence for that loss (a group with no strict pair carries none
for Bradley–Terry). :func:`reduce_groups` averages over valid groups, weighted when each ranking
has a weight (its annotator's reliability, docs/reward-models.md). Formulas: docs/rankings.md.

Where this deviates from the papers:

- Grouped BT averages each prompt's pairs (InstructGPT §3.5: "the loss for each comparison is
  divided by C(K,2)"), so every *ranking* weighs the same; pairwise BT over the same pairs
  weighs every *pair* the same. The two are equal when each group is weighted by its number of
  strict pairs (:func:`grouped_bradley_terry_loss` with ``weight_by_pairs=True``), tested.
- Rao–Kupper and Davidson average the log-likelihood of *every* pair of a group (strict pairs
  and ties alike), so an all-tied ranking still teaches the model its responses are equally good.
- Plackett–Luce with ties uses Breslow's treatment of tied events (Breslow 1974, the usual
  approximation for ties in Cox's partial likelihood): a tier is one step, and *each* member of
  tier t is chosen from the same remaining set (tier t and all later tiers):
  ``P = Π_t Π_{i ∈ T_t} exp(r_i) / Σ_{j ∈ T_t ∪ T_{t+1} ∪ ...} exp(r_j)``.
  The order inside a tier does not count; on a strict ranking this is exactly Plackett–Luce;
  for an all-tied group it is maximised when the tied rewards are equal (AM–GM), so ties pull
  rewards together instead of being ignored. The last step is kept even when the last tier is a
  single candidate (it contributes log 1 = 0).

Rao–Kupper's θ and Davidson's ν are learned with the model; the functions that turn the model's
raw parameter into them, and choose its starting value from the data's tie rate, close the module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # reward_models.groups imports this module: a type only, no cycle at run time
    from reward_models.groups import Group

# ----------------------------------------------------------------------------- pair structure


def pair_masks(tiers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict-pair and tie masks of a batch of rankings.

    Args:
        tiers: ``[B, K]`` long, tier index per candidate (0 = best), -1 = padding/unranked.

    Returns:
        ``beats`` ``[B, K, K]`` bool, ``beats[b, i, j]`` = candidate i is ranked strictly above j;
        ``ties`` ``[B, K, K]`` bool, ``ties[b, i, j]`` = i and j are tied, only for ``i < j`` (each
        unordered tied pair once).
    """
    valid = tiers >= 0
    both = valid[:, :, None] & valid[:, None, :]
    ti, tj = tiers[:, :, None], tiers[:, None, :]
    beats = both & (ti < tj)
    upper = torch.ones(tiers.shape[1], tiers.shape[1], dtype=torch.bool, device=tiers.device).triu(1)
    ties = both & (ti == tj) & upper
    return beats, ties


def reduce_groups(
    loss: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``loss [B]`` over groups where ``valid [B]`` is true (0 when none is).

    With ``weights [B]`` (≥ 0, e.g. each ranking's annotator reliability, rlhf/reliability.py) the
    weighted mean ``Σ w·loss / Σ w`` over the valid groups (0 when their weights sum to 0). Weight 1
    everywhere gives the unweighted mean exactly."""
    if weights is None:
        w = valid.to(loss.dtype)
        return (loss * w).sum() / w.sum().clamp_min(1.0)
    w = weights.to(loss.dtype) * valid.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp_min(torch.finfo(loss.dtype).tiny)


# ----------------------------------------------------------------------------- Bradley–Terry


def bradley_terry_pair_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """``-log σ(r_w - r_l - m)`` per pair (Bradley & Terry 1952; margin as in Llama 2).

    Args: ``r_chosen``, ``r_rejected`` ``[N]``; ``margin`` scalar or ``[N]``. Returns ``[N]``.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def bradley_terry_loss(
    rewards: torch.Tensor, tiers: torch.Tensor, margin: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley–Terry summed over each group's strict pairs (ties dropped), *not* averaged.

    Use with :func:`pairwise_mean` to weigh every pair equally across the batch (what a
    pairs-only trainer computes), or see :func:`grouped_bradley_terry_loss`.

    Args: ``rewards`` ``[B, K]`` float, ``tiers`` ``[B, K]`` long.
    Returns: ``(sum_loss [B], n_pairs [B])`` — per-group sum of pair losses and number of strict pairs.
    """
    beats, _ = pair_masks(tiers)
    diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K]: r_i - r_j
    per_pair = -F.logsigmoid(diff - margin)
    per_pair = torch.where(beats, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum(dim=(1, 2)), beats.sum(dim=(1, 2))


def pairwise_mean(
    sum_loss: torch.Tensor, n_pairs: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over all strict pairs of the batch: ``Σ_b sum_loss_b / Σ_b n_b`` (scalar). With
    ``weights [B]`` every pair of group b weighs ``w_b``: ``Σ_b w_b sum_loss_b / Σ_b w_b n_b``."""
    if weights is None:
        return sum_loss.sum() / n_pairs.sum().clamp_min(1).to(sum_loss.dtype)
    w = weights.to(sum_loss.dtype)
    return (w * sum_loss).sum() / (w * n_pairs.to(sum_loss.dtype)).sum().clamp_min(
        torch.finfo(sum_loss.dtype).tiny
    )


def grouped_bradley_terry_loss(
    rewards: torch.Tensor, tiers: torch.Tensor, margin: float = 0.0, weight_by_pairs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's grouped Bradley–Terry: the mean over each prompt's C(K,2) strict pairs.

    Args: ``rewards`` ``[B, K]``, ``tiers`` ``[B, K]``; ``weight_by_pairs`` multiplies each group's
    mean by ``n_b / mean(n)`` so that :func:`reduce_groups` equals the pairwise mean over the same
    pairs (when every group is valid).
    Returns: ``(loss [B], valid [B])``, valid = the group has at least one strict pair.
    """
    total, n = bradley_terry_loss(rewards, tiers, margin)
    valid = n > 0
    loss = total / n.clamp_min(1).to(total.dtype)
    if weight_by_pairs:
        nf = n.to(total.dtype)
        loss = loss * nf / nf[valid].mean().clamp_min(1.0) if valid.any() else loss
    return loss, valid


# ----------------------------------------------------------------------------- ties: Rao–Kupper


def rao_kupper_log_probs(
    r_i: torch.Tensor, r_j: torch.Tensor, log_theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``i ≻ j``, ``j ≻ i`` and a tie under Rao & Kupper (1967).

    ``P(i ≻ j) = σ(r_i - r_j - log θ)``, ``P(tie) = 1 - P(i ≻ j) - P(j ≻ i)``, θ ≥ 1. The tie term
    uses the closed form ``(θ² - 1) π_i π_j / ((π_i + θ π_j)(θ π_i + π_j))`` with ``π = exp(r)``,
    computed in log space so it stays finite for large reward gaps.

    Args: ``r_i``, ``r_j`` any broadcastable shape; ``log_theta`` scalar tensor ≥ 0.
    Returns: three tensors of the broadcast shape.
    """
    d = r_i - r_j
    log_win = F.logsigmoid(d - log_theta)
    log_loss = F.logsigmoid(-d - log_theta)
    log_tie = (
        torch.log(torch.expm1(2 * log_theta))
        + r_i
        + r_j
        - torch.logaddexp(r_i, r_j + log_theta)
        - torch.logaddexp(r_i + log_theta, r_j)
    )
    return log_win, log_loss, log_tie


def _pairwise_event_nll(
    log_win: torch.Tensor, log_tie: torch.Tensor, tiers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over all pairs of a group given ``[B, K, K]`` log P(i ≻ j) and log P(tie)."""
    beats, ties = pair_masks(tiers)
    zero = torch.zeros_like(log_win)
    nll = -(torch.where(beats, log_win, zero) + torch.where(ties, log_tie, zero)).sum(dim=(1, 2))
    n = beats.sum(dim=(1, 2)) + ties.sum(dim=(1, 2))
    return nll / n.clamp_min(1).to(nll.dtype), n > 0


def rao_kupper_loss(
    rewards: torch.Tensor, tiers: torch.Tensor, log_theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rao–Kupper NLL averaged over every pair (strict and tied) of each group.

    Args: ``rewards`` ``[B, K]``, ``tiers`` ``[B, K]``, ``log_theta`` scalar tensor (≥ 0; learn it as
    ``softplus(param)``). Returns ``(loss [B], valid [B])``, valid = at least one pair.
    """
    r_i, r_j = rewards[:, :, None], rewards[:, None, :]
    log_win, _, log_tie = rao_kupper_log_probs(r_i, r_j, log_theta)
    return _pairwise_event_nll(log_win, log_tie, tiers)


# ----------------------------------------------------------------------------- ties: Davidson


def davidson_log_probs(
    r_i: torch.Tensor, r_j: torch.Tensor, log_nu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``i ≻ j``, ``j ≻ i`` and a tie under Davidson (1970).

    With ``π = exp(r)`` and ``ν = exp(log_nu) ≥ 0``: the denominator is
    ``π_i + π_j + ν √(π_i π_j)``; ``P(tie) = ν √(π_i π_j) / denominator``.

    Args: ``r_i``, ``r_j`` broadcastable; ``log_nu`` scalar tensor. Returns three tensors.
    """
    r_i, r_j = torch.broadcast_tensors(r_i, r_j)
    tie_logit = log_nu + (r_i + r_j) / 2
    log_den = torch.logsumexp(torch.stack([r_i, r_j, tie_logit.expand_as(r_i)]), dim=0)
    return r_i - log_den, r_j - log_den, tie_logit - log_den


def davidson_loss(
    rewards: torch.Tensor, tiers: torch.Tensor, log_nu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Davidson NLL averaged over every pair (strict and tied) of each group.

    Args: ``rewards`` ``[B, K]``, ``tiers`` ``[B, K]``, ``log_nu`` scalar tensor.
    Returns ``(loss [B], valid [B])``.
    """
    r_i, r_j = rewards[:, :, None], rewards[:, None, :]
    log_win, _, log_tie = davidson_log_probs(r_i, r_j, log_nu)
    return _pairwise_event_nll(log_win, log_tie, tiers)


# ----------------------------------------------------------------------------- Plackett–Luce


def plackett_luce_loss(rewards: torch.Tensor, tiers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of each whole ranking under Plackett–Luce over tiers (Breslow ties).

    ``-log P = -Σ_i [ r_i - log Σ_{j : tier_j ≥ tier_i} exp(r_j) ]`` over valid candidates i — every
    member of a tier is chosen from the set of its own tier and all later tiers (module docstring).

    Args: ``rewards`` ``[B, K]``, ``tiers`` ``[B, K]``.
    Returns ``(loss [B], valid [B])``, valid = at least two ranked candidates.
    """
    valid_c = tiers >= 0
    # remaining[b, i, j]: j is still in the choice set when i's tier is chosen.
    remaining = valid_c[:, None, :] & valid_c[:, :, None] & (tiers[:, None, :] >= tiers[:, :, None])
    logits = rewards[:, None, :].expand_as(remaining).masked_fill(~remaining, float("-inf"))
    log_den = torch.logsumexp(logits, dim=-1)  # [B, K]; -inf rows only for padding
    step = torch.where(valid_c, rewards - log_den, torch.zeros_like(rewards))
    return -step.sum(dim=1), valid_c.sum(dim=1) >= 2


# ----------------------------------------------------------------------------- centring


def reward_centering(rewards: torch.Tensor, tiers: torch.Tensor, coef: float) -> torch.Tensor:
    """``coef · mean(r)²`` over the valid candidates of the batch (Eisenstein et al. 2023).

    BT-style losses only see reward differences, so the overall level drifts freely; this
    penalises the mean away from 0. Args: ``rewards`` ``[B, K]``, ``tiers`` ``[B, K]``. Scalar.
    """
    if coef == 0:
        return rewards.new_zeros(())
    valid = (tiers >= 0).to(rewards.dtype)
    mean = (rewards * valid).sum() / valid.sum().clamp_min(1.0)
    return coef * mean**2


# ----------------------------------------------------------------------------- dispatch

LOSSES = ("bt", "grouped_bt", "rao_kupper", "davidson", "plackett_luce")
TIE_AWARE = ("rao_kupper", "davidson", "plackett_luce")
PAIRWISE_TIE_MODELS = ("rao_kupper", "davidson")


def ranking_loss(
    name: str,
    rewards: torch.Tensor,
    tiers: torch.Tensor,
    *,
    margin: float = 0.0,
    tie_param: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The scalar training loss ``name`` for a batch, and the number of groups it used.

    ``bt``: mean over all strict pairs of the batch; ``grouped_bt``: mean over groups of each
    group's mean pair loss; ``rao_kupper`` (``tie_param`` = log θ), ``davidson`` (``tie_param`` =
    log ν): mean over groups of the mean pair NLL; ``plackett_luce``: mean over groups of the
    ranking NLL. Args: ``rewards`` ``[B, K]``, ``tiers`` ``[B, K]``.

    ``weights`` ``[B]`` (≥ 0; None = all 1) weighs each ranking: the means over groups become
    weighted means (:func:`reduce_groups`), and for ``bt`` every pair of a ranking weighs its
    ranking's weight. A ranking of weight 0 is not counted as used.
    """
    if name == "bt":
        total, n = bradley_terry_loss(rewards, tiers, margin)
        return pairwise_mean(total, n, weights), _count_used(n > 0, weights)
    if name == "grouped_bt":
        loss, valid = grouped_bradley_terry_loss(rewards, tiers, margin)
    elif name == "rao_kupper":
        loss, valid = rao_kupper_loss(rewards, tiers, tie_param)
    elif name == "davidson":
        loss, valid = davidson_loss(rewards, tiers, tie_param)
    elif name == "plackett_luce":
        loss, valid = plackett_luce_loss(rewards, tiers)
    else:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return reduce_groups(loss, valid, weights), _count_used(valid, weights)


def _count_used(valid: torch.Tensor, weights: torch.Tensor | None) -> int:
    """Rankings that carry evidence for the loss: valid ones, of weight > 0 when weighted."""
    return int(valid.sum()) if weights is None else int((valid & (weights > 0)).sum())


# ----------------------------------------------------------------------------- tie parameters
# The reward model holds one learned scalar ρ (its ``tie_param``) for the tie-aware pairwise
# losses: log θ = softplus(ρ) ≥ 0 for Rao–Kupper, log ν = ρ for Davidson (docs/rankings.md).


def tie_log_param(loss: str, raw: torch.Tensor | None) -> torch.Tensor | None:
    """The loss's tie parameter from the raw learned value: log θ = softplus(raw) ≥ 0; log ν = raw."""
    if raw is None:
        return None
    return F.softplus(raw) if loss == "rao_kupper" else raw


def tie_rate(groups: Iterable[Group]) -> float:
    """The fraction of candidate pairs that the rankings tie (every ranking of every group)."""
    tied = total = 0
    for g in groups:
        for tiers in g.rankings:
            for i in range(len(tiers)):
                for j in range(i + 1, len(tiers)):
                    total += 1
                    tied += tiers[i] == tiers[j]
    return tied / total if total else 0.0


def initial_tie_value(loss: str, theta: float | None, nu: float | None, rate: float) -> float | None:
    """θ or ν to start from: the configured value, else the one whose P(tie) at equal rewards is the
    data's tie rate t — Rao–Kupper (θ - 1) / (θ + 1) = t, Davidson ν / (2 + ν) = t (clamped so a
    tie-free data set still allows a few)."""
    t = min(max(rate, 0.01), 0.9)
    if loss == "rao_kupper":
        return theta if theta is not None else (1 + t) / (1 - t)
    if loss == "davidson":
        return nu if nu is not None else 2 * t / (1 - t)
    return None


def initial_tie_raw(loss: str, value: float | None) -> float | None:
    """The raw learned parameter for a θ / ν value (inverse of :func:`tie_log_param`)."""
    if value is None:
        return None
    if loss == "rao_kupper":
        y = math.log(value)  # softplus⁻¹(log θ)
        return y + math.log(-math.expm1(-y))
    return math.log(value)


def tie_values(loss: str, raw: torch.Tensor | None) -> dict[str, float]:
    """θ or ν (``{"theta": θ}`` / ``{"nu": ν}``) from the raw learned value, as logged and saved;
    ``{}`` for a loss without a tie parameter."""
    lp = tie_log_param(loss, raw)
    if lp is None:
        return {}
    lp = lp.detach()
    return {"theta": math.exp(float(lp))} if loss == "rao_kupper" else {"nu": math.exp(float(lp))}
