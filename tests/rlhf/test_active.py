"""Active selection: the uncertainty measures against hand-computed values, and their order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.active import ensemble_uncertainty, least_certain_first, margin_uncertainty, uncertainty
from rlhf.errors import UserError
from rlhf.rewards import EnsembleRewardFunction, ScorerFunction


def test_margin_is_minus_the_closest_gap():
    assert margin_uncertainty([0.0, 1.0, 3.0]) == pytest.approx(-1.0)
    assert margin_uncertainty([3.0, 0.2, 0.0]) == pytest.approx(-0.2)  # order of responses is irrelevant
    assert margin_uncertainty([0.5, 0.5, 2.0]) == 0.0  # a dead heat: as uncertain as it gets


def test_ensemble_disagreement_by_hand():
    assert ensemble_uncertainty(np.array([[0.0, 2.0], [0.0, 2.0]])) == 0.0  # members agree
    # members prefer opposite responses by 1: P(0 ≻ 1) is σ(1) and σ(-1); population std = (σ(1) - σ(-1)) / 2
    sigma = 1 / (1 + math.exp(-1))
    assert ensemble_uncertainty(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx((2 * sigma - 1) / 2)
    # three responses: pairs (0,1), (0,2), (1,2); only pairs involving response 2 disagree
    three = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    p = 1 / (1 + np.exp(-np.array([-1.0, 1.0])))
    assert ensemble_uncertainty(three) == pytest.approx((0 + p.std() + p.std()) / 3)


def _records():
    # length:target=4 (words): score -|n - 4| / 4
    return [
        {
            "prompt_id": "clear",
            "prompt": "p",
            "candidates": [{"text": "a b c d"}, {"text": "a"}],
        },  # 0 vs -0.75
        {
            "prompt_id": "close",
            "prompt": "p",
            "candidates": [{"text": "a b c"}, {"text": "a b c d e"}],
        },  # tie
        {
            "prompt_id": "middle",
            "prompt": "p",
            "candidates": [{"text": "a b c d"}, {"text": "a b"}],
        },  # 0 vs -0.5
    ]


def test_least_certain_prompts_come_first():
    scores = uncertainty(_records(), ScorerFunction("length:target=4"), "margin")
    assert scores == pytest.approx({"clear": -0.75, "close": 0.0, "middle": -0.5})
    assert least_certain_first(scores) == ["close", "middle", "clear"]


def test_ensemble_measure_needs_an_ensemble():
    with pytest.raises(UserError, match="needs an ensemble"):
        uncertainty(_records(), ScorerFunction("length:target=4"), "ensemble")
    with pytest.raises(UserError, match="must be one of margin, ensemble"):
        uncertainty(_records(), ScorerFunction("length:target=4"), "entropy")
    # members that judge by different target lengths disagree most where their targets part ways
    pair = EnsembleRewardFunction(
        [ScorerFunction("length:target=1"), ScorerFunction("length:target=5")], "mean"
    )
    scores = uncertainty(_records(), pair, "ensemble")
    assert least_certain_first(scores)[0] == "clear"  # "a" vs "a b c d": the members' orders are opposite
