"""Active selection: which unranked prompts a reward model is least sure how to rank, so that people
rank those first (``rlhf annotate prioritize``; measured in
``experiments/benchmarks/bench_active_selection.py``).

Two measures of how unsure a reward model is about a prompt's K responses, both "higher = less
certain", so prompts are served in decreasing order:

- ``margin``: the smallest gap between two of its responses' scores, negated. Uncertainty
  sampling by margin (Scheffer, Decomain & Wrobel 2001): a reward model trained with a
  Bradley–Terry loss says P(i ≻ j) = σ(s_i − s_j), so the closest pair is the comparison it is
  nearest to a coin flip on, and a person's ranking of it moves the model most.
- ``ensemble``: how much the members of a reward-model ensemble (``rlhf rm train --ensemble N``)
  disagree: per pair of responses, the standard deviation over members of P(i ≻ j) = σ(s_i − s_j),
  averaged over the prompt's pairs (query by committee, Seung, Opper & Sompolinsky 1992). Members
  that disagree mark what the rankings so far did not pin down, whatever each member's margin.

Every member's scores are normalised on its own reference samples (``rlhf_reward.json``), so the
gaps are on one scale for any reward model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

from rlhf.errors import UserError
from rlhf.rewards import EnsembleRewardFunction, RewardFunction, score_candidates

MEASURES = ("margin", "ensemble")


def margin_uncertainty(scores: Sequence[float]) -> float:
    """Minus the smallest gap between two responses' scores (higher: less certain)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    return float(-np.min(np.diff(s)))


def ensemble_uncertainty(member_scores: np.ndarray) -> float:
    """``member_scores [members, K]`` → the mean over response pairs of the members' standard
    deviation of P(i ≻ j) = σ(s_i − s_j) (higher: they disagree more)."""
    spread = []
    for i, j in combinations(range(member_scores.shape[1]), 2):
        p = 1.0 / (1.0 + np.exp(-(member_scores[:, i] - member_scores[:, j])))
        spread.append(p.std())
    return float(np.mean(spread))


def uncertainty(
    records: Sequence[Mapping], reward: RewardFunction, measure: str = "margin"
) -> dict[str, float]:
    """``{prompt_id: uncertainty}`` of candidates records (``prompt``, ``candidates`` with ``text``)
    under ``reward``; ``ensemble`` needs an ensemble reward (an ensemble dir or ``ensemble:...``)."""
    if measure not in MEASURES:
        raise UserError(
            f"uncertainty measure must be one of {', '.join(MEASURES)}, got {measure!r}", code="config"
        )
    if measure == "ensemble" and not isinstance(reward, EnsembleRewardFunction):
        raise UserError(
            f"--by ensemble needs an ensemble of reward models (rlhf rm train --ensemble N, or "
            f"ensemble:mean:DIR,DIR); {reward.name} is one model: use --by margin",
            code="config",
        )
    # every member scores all responses in one call; a single reward model is a committee of one
    members = reward.members if isinstance(reward, EnsembleRewardFunction) else [reward]
    per_member = [
        score_candidates(member, records, progress=f"prioritize: scoring with {member.name}")
        for member in members
    ]
    out = {}
    for i, rec in enumerate(records):
        mine = np.array([scores[i] for scores in per_member])  # [members, K]
        out[rec["prompt_id"]] = (
            ensemble_uncertainty(mine) if measure == "ensemble" else margin_uncertainty(mine.mean(0))
        )
    return out


def least_certain_first(uncertainties: Mapping[str, float]) -> list[str]:
    """Prompt ids, least certain first (ties: in the given order)."""
    return sorted(uncertainties, key=lambda pid: -uncertainties[pid])
