"""reward_models.length_lean: the reward's lean on length against the gold's, by hand."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from reward_models.length_lean import (
    gold_corr,
    joint_moments_by_prompt,
    length_corr_beyond,
    length_corr_explained,
    length_lean_metrics,
    longer_preferred_by_prompt,
    moments_by_prompt,
    pearson_from_moments,
    share,
)

# two prompts; the second has three answers (the fourth column is padding)
LENGTHS = torch.tensor([[3, 5, 5, 1], [10, 2, 7, 99]])
VALID = torch.tensor([[True, True, True, True], [True, True, True, False]])
SCORES = torch.tensor([[0.2, 0.9, 0.1, 0.5], [1.0, 0.0, 3.0, 1e6]], dtype=torch.float64)


def test_longer_preferred_counts_pairs_of_one_prompt_by_hand():
    units = longer_preferred_by_prompt(SCORES, LENGTHS, VALID)
    # prompt 1, (longer, shorter): (5a, 3) +0.7 win; (5b, 3) -0.1; (3, 1) -0.3; (5a, 1) +0.4 win;
    # (5b, 1) -0.4; the two answers of 5 words are not a pair of different lengths
    # prompt 2: (10, 2) +1 win; (10, 7) -2; (7, 2) +3 win; the padding never enters
    assert units.tolist() == [[2.0, 5.0], [2.0, 3.0]]
    assert share(units) == pytest.approx(4 / 8)


def test_a_threshold_leaves_out_pairs_it_does_not_separate():
    units = longer_preferred_by_prompt(SCORES, LENGTHS, VALID, threshold=0.35)
    # prompt 1 keeps +0.7 (win), +0.4 (win), -0.4; prompt 2 keeps all three
    assert units.tolist() == [[2.0, 3.0], [2.0, 3.0]]


def test_equal_scores_are_no_preference():
    units = longer_preferred_by_prompt(
        torch.zeros(1, 3), torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
    )
    assert units.tolist() == [[0.0, 0.0]]
    assert math.isnan(share(units))


def test_pearson_from_moments_is_the_pooled_correlation_of_the_valid_responses():
    m = moments_by_prompt(SCORES, LENGTHS, VALID)
    assert m[1, 0] == 3  # the padded answer is not counted
    xs = [0.2, 0.9, 0.1, 0.5, 1.0, 0.0, 3.0]
    ys = [3, 5, 5, 1, 10, 2, 7]
    assert pearson_from_moments(m) == pytest.approx(pearsonr(xs, ys).statistic, abs=1e-12)
    assert math.isnan(pearson_from_moments(moments_by_prompt(torch.ones(2, 4), LENGTHS, VALID)))


def test_a_reward_that_is_length_leans_fully_and_its_negation_not_at_all():
    as_length = length_lean_metrics(LENGTHS.double(), None, LENGTHS, VALID)
    assert as_length["eval/length_corr"] == pytest.approx(1.0)
    assert as_length["eval/longer_preferred"] == 1.0
    against = length_lean_metrics(-LENGTHS.double(), None, LENGTHS, VALID)
    assert against["eval/length_corr"] == pytest.approx(-1.0)
    assert against["eval/longer_preferred"] == 0.0
    assert not any(k.startswith("eval/gold_") or "excess" in k for k in as_length)


def test_invariant_to_a_positive_affine_map_and_to_the_order_of_the_answers():
    base = length_lean_metrics(SCORES, None, LENGTHS, VALID)
    mapped = length_lean_metrics(3.0 * SCORES - 7.0, None, LENGTHS, VALID)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = length_lean_metrics(SCORES[:, order], None, LENGTHS[:, order], VALID[:, order])
    for key in ("eval/length_corr", "eval/longer_preferred"):
        assert mapped[key] == pytest.approx(base[key])
        assert shuffled[key] == pytest.approx(base[key])


def test_the_excess_over_the_gold_is_model_minus_gold_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    lengths = torch.as_tensor(rng.integers(1, 60, (40, 4)))
    valid = torch.ones(40, 4, dtype=torch.bool)
    gold = torch.as_tensor(rng.normal(size=(40, 4)))
    model = gold + 0.05 * lengths  # the gold plus a lean on length
    out = length_lean_metrics(model, gold, lengths, valid)
    for name in ("length_corr", "longer_preferred"):
        excess = out[f"eval/{name}"] - out[f"eval/gold_{name}"]
        assert out[f"eval/{name}_excess"] == pytest.approx(excess)
        assert excess > 0
        for key in (f"eval/{name}", f"eval/gold_{name}", f"eval/{name}_excess"):
            assert out[f"{key}_ci_low"] <= out[key] <= out[f"{key}_ci_high"]
    assert out["eval/longer_preferred_excess_ci_low"] > 0  # a lean this strong is seen through the noise
    same = length_lean_metrics(gold, gold, lengths, valid)
    assert same["eval/length_corr_excess"] == 0.0 and same["eval/longer_preferred_excess"] == 0.0


GOLD = torch.tensor([[0.1, 0.8, 0.3, 0.0], [0.9, -0.2, 2.0, -5.0]], dtype=torch.float64)


def test_the_explained_length_correlation_by_hand():
    m = joint_moments_by_prompt(SCORES, GOLD, LENGTHS, VALID)
    assert m[1, 0] == 3  # the padded answer is not counted
    r = [0.2, 0.9, 0.1, 0.5, 1.0, 0.0, 3.0]
    g = [0.1, 0.8, 0.3, 0.0, 0.9, -0.2, 2.0]
    n = [3, 5, 5, 1, 10, 2, 7]
    agreement = pearsonr(r, g).statistic
    assert gold_corr(m) == pytest.approx(agreement, abs=1e-12)
    assert length_corr_explained(m) == pytest.approx(pearsonr(g, n).statistic / agreement, abs=1e-12)
    assert length_corr_beyond(m) == pytest.approx(
        pearsonr(r, n).statistic - pearsonr(g, n).statistic / agreement, abs=1e-12
    )
    # a reward against the gold explains nothing
    assert math.isnan(length_corr_explained(joint_moments_by_prompt(-GOLD, GOLD, LENGTHS, VALID)))
    # a gold that is its length, and a reward that agrees with it less than the length does:
    # no reward carrying the length could, so there is no reference (0.76 agreement, 1.0 length)
    as_length = LENGTHS.double()
    partly = as_length + torch.tensor([[3.0, -3.0, 0.0, 0.0], [0.0, 2.0, -2.0, 0.0]], dtype=torch.float64)
    m = joint_moments_by_prompt(partly, as_length, LENGTHS, VALID)
    assert (
        0 < gold_corr(m) < 1.0 and math.isnan(length_corr_explained(m)) and math.isnan(length_corr_beyond(m))
    )
    # the gold itself: nothing beyond its own lean
    assert length_corr_beyond(joint_moments_by_prompt(GOLD, GOLD, LENGTHS, VALID)) == pytest.approx(0.0)


def test_the_best_predictor_of_the_gold_leans_beyond_it_only_by_what_its_accuracy_explains():
    # gold = length part + content; the reward knows the length and half the content's variance:
    # it is E[gold | what it reads], which leans on length more than the gold does, and no more
    # than its agreement with the gold explains; the same reward plus a lean of its own leans beyond
    rng = np.random.default_rng(0)
    lengths = torch.as_tensor(rng.integers(1, 60, (600, 4))).double()
    valid = torch.ones(600, 4, dtype=torch.bool)
    known, unknown = (torch.as_tensor(rng.normal(size=(600, 4))) for _ in range(2))
    gold = 0.03 * lengths + known + unknown
    best = 0.03 * lengths + known
    out = length_lean_metrics(best, gold, lengths, valid)
    assert out["eval/length_corr_excess_ci_low"] > 0.05  # above the gold's own, clearly
    assert out["eval/length_corr_beyond_ci_low"] < 0 < out["eval/length_corr_beyond_ci_high"]
    assert abs(out["eval/length_corr_beyond"]) < 0.05
    leaning = length_lean_metrics(best + 0.02 * lengths, gold, lengths, valid)
    assert leaning["eval/length_corr_beyond_ci_low"] > 0.1
    for key in ("eval/gold_corr", "eval/length_corr_explained", "eval/length_corr_beyond"):
        assert out[f"{key}_ci_low"] <= out[key] <= out[f"{key}_ci_high"]
