"""RewardBench 2's best-of-K accuracy and Ties score on the lab's rankings, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from reward_models.evaluate import best_of_k, rewardbench2_metrics, ties_outcomes, ties_score


def test_best_of_k_needs_the_single_best_above_every_other():
    rewards = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # A > C > B > D: A highest → 1
            [0.4, 0.6, 0.5, 0.1],  # A > ...: B scored above A → 0
            [0.9, 0.9, 0.1, 0.0],  # A = B > C > D: no single best → NaN
            [0.2, 0.7, 0.0, 0.0],  # B > A, K = 2 (C, D padding) → 1
        ],
        dtype=torch.float64,
    )
    tiers = torch.tensor([[0, 2, 1, 3], [0, 1, 2, 3], [0, 0, 1, 2], [1, 0, -1, -1]])
    won = best_of_k(rewards, tiers)
    assert won[:2].tolist() == [1.0, 0.0] and math.isnan(won[2]) and won[3] == 1.0
    # a tie with the best is not "above every other"
    assert best_of_k(torch.tensor([[0.5, 0.5]]), torch.tensor([[0, 1]])).tolist() == [0.0]


def test_ties_outcomes_and_score_by_hand():
    rewards = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # A = B > C > D: gap 0.8 - 0.1 = 0.7 > spread 0.1 → accurate, preferred
            [0.9, 0.3, 0.2, 0.0],  # gap 0.1 > 0, spread 0.6 → accurate, not preferred
            [0.9, 0.1, 0.2, 0.0],  # lowest tied best 0.1 under C's 0.2 → neither
            [0.9, 0.1, 0.2, 0.0],  # A > B > C > D: not a tied top tier → NaN
        ],
        dtype=torch.float64,
    )
    tiers = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 1], [0, 0, 1, 2], [0, 1, 2, 3]])
    accurate, preferred = ties_outcomes(rewards, tiers)
    assert accurate[:3].tolist() == [1.0, 1.0, 0.0] and preferred[:3].tolist() == [1.0, 0.0, 0.0]
    assert math.isnan(accurate[3]) and math.isnan(preferred[3])
    # 0.6 · 2/3 + 0.4 · 1/3 = 0.5333
    assert ties_score([(2.0, 1.0, 3.0)]) == pytest.approx(0.6 * 2 / 3 + 0.4 / 3)
    metrics = rewardbench2_metrics(rewards, tiers, torch.tensor([0, 1, 2, 3]), 4, seed=0, key="")
    assert metrics["eval/ties_score"] == pytest.approx(0.6 * 2 / 3 + 0.4 / 3)
    assert metrics["eval/ties_rankings"] == 3 and metrics["eval/best_of_k_rankings"] == 1
    assert metrics["eval/best_of_k_accuracy"] == 1.0 and metrics["eval/best_of_k_chance"] == 0.25
    assert (
        metrics["eval/ties_score_ci_low"] <= metrics["eval/ties_score"] <= metrics["eval/ties_score_ci_high"]
    )
