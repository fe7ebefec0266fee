"""Annotator reliability (rlhf/reliability.py): hand-computed EM steps, recovery of simulated pools,
gold anchors, and the invariances the model must have."""

from __future__ import annotations

import copy
import random
from fractions import Fraction

import numpy as np
import pytest

from rlhf.rankings import parse_ranking
from rlhf.reliability import (
    FIRST_BETTER,
    SECOND_BETTER,
    TIE,
    ReliabilityPrior,
    e_step,
    fit_reliability,
    label_items,
    log_posterior,
    m_step,
    majority_vote,
    pair_outcomes,
)


def record(prompt_id: str, annotator: str, tiers: list[list[str]], k: int = 4) -> dict:
    labels = [chr(65 + i) for i in range(k)]
    return {
        "prompt_id": prompt_id,
        "annotator": annotator,
        "candidates": [{"label": lab, "text": f"response {lab}"} for lab in labels],
        "tiers": tiers,
    }


def simulated_ranking(gold: dict[str, int], kind: str, rng: random.Random) -> list[list[str]]:
    """A ``good`` annotator orders by gold plus noise (about 93 % of strict pairs right) and ties the
    candidates whose gold is equal; ``careless`` puts the candidates in random places of the same
    tier shape (ties at the same rate); ``reversed`` reverses a good ranking."""
    labels = sorted(gold)
    noisy = {lab: gold[lab] + rng.gauss(0, 0.6) for lab in labels}
    order = sorted(labels, key=lambda lab: -noisy[lab])
    tiers = [[order[0]]]
    for prev, cur in zip(order, order[1:]):
        if gold[cur] == gold[prev]:
            tiers[-1].append(cur)
        else:
            tiers.append([cur])
    if kind == "careless":
        shuffled = rng.sample(labels, len(labels))
        tiers = [[shuffled.pop() for _ in tier] for tier in tiers]
    elif kind == "reversed":
        tiers = tiers[::-1]
    return tiers


def gold_tiers(gold: dict[str, int]) -> list[list[str]]:
    return [[lab for lab in sorted(gold) if gold[lab] == v] for v in sorted(set(gold.values()), reverse=True)]


def simulated_pool(kinds: dict[str, str], n_prompts: int = 300, quorum: int = 3, seed: int = 0):
    """Rankings of ``n_prompts`` prompts of K = 4 (gold scores 0..5: equal scores are true ties), each
    by ``quorum`` annotators drawn from ``kinds``; returns the records and the gold per prompt."""
    rng = random.Random(seed)
    records, golds = [], {}
    for p in range(n_prompts):
        gold = {lab: rng.randint(0, 5) for lab in "ABCD"}
        golds[f"p{p}"] = gold
        for name in rng.sample(sorted(kinds), quorum):
            records.append(record(f"p{p}", name, simulated_ranking(gold, kinds[name], rng)))
    return records, golds


MIXED_POOL = {
    **{f"good-{i}": "good" for i in range(6)},
    "careless-0": "careless",
    "careless-1": "careless",
    "reversed-0": "reversed",
    "reversed-1": "reversed",
}


@pytest.fixture(scope="module")
def mixed_pool():
    return simulated_pool(MIXED_POOL, seed=0)


def assert_same_fit(fit, other, rename=lambda name: name):
    assert other.items == fit.items and other.iterations == fit.iterations
    assert other.prior_tie == pytest.approx(fit.prior_tie, rel=1e-9)
    for name, a in fit.annotators.items():
        b = other.annotators[rename(name)]
        assert b.pairs == a.pairs
        for key in ("strict_correct", "strict_reversed", "tie_kept", "expected_accuracy", "weight"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9, abs=1e-12), (name, key)


# ----------------------------------------------------------------------------- labelled items


def test_pair_outcomes_of_c_gt_b_eq_d_gt_a():
    ranking = parse_ranking("C > B = D > A", "ABCD")
    assert pair_outcomes(ranking) == {
        ("A", "B"): SECOND_BETTER,
        ("A", "C"): SECOND_BETTER,
        ("A", "D"): SECOND_BETTER,
        ("B", "C"): SECOND_BETTER,
        ("B", "D"): TIE,
        ("C", "D"): FIRST_BETTER,
    }


def test_ranking_text_and_tiers_give_the_same_labels():
    as_tiers = [record("p", "x", [["C"], ["B", "D"], ["A"]])]
    as_text = [{**as_tiers[0], "tiers": None, "ranking": "c > d = b > a"}]
    a, b = label_items(as_tiers), label_items(as_text)
    assert a.items == b.items and a.outcome.tolist() == b.outcome.tolist()


# ----------------------------------------------------------------------------- one EM round by hand


def test_one_em_round_by_hand():
    """One pair A, B; x and y say A > B, z says B > A. Default pseudo-counts (4:1:1 on a strict pair,
    2:1 on a tie, 1:1 on the class prior)."""
    records = [
        record("p", "x", [["A"], ["B"]], k=2),
        record("p", "y", [["A"], ["B"]], k=2),
        record("p", "z", [["B"], ["A"]], k=2),
    ]
    labels = label_items(records)
    assert labels.items == [("p", "A", "B")] and labels.annotators == ["x", "y", "z"]
    start = majority_vote(labels)
    assert start[0].tolist() == pytest.approx([2 / 3, 0, 1 / 3])

    params = m_step(start, labels, ReliabilityPrior())
    # x (and y): right with weight 2/3, reversed 1/3, no tie; over 1 + 6 pseudo-pairs
    # z: right 1/3 (truth B > A), reversed 2/3
    third = Fraction(1, 3)
    a_x, r_x = (2 * third + 4) / 7, (third + 1) / 7
    a_z, r_z = (third + 4) / 7, (2 * third + 1) / 7
    e = Fraction(2, 3)  # no tie evidence: the prior's 2 / (2 + 1)
    assert params.strict_correct.tolist() == pytest.approx([float(a_x), float(a_x), float(a_z)])
    assert params.strict_reversed.tolist() == pytest.approx([float(r_x), float(r_x), float(r_z)])
    assert params.tie_kept.tolist() == pytest.approx([float(e)] * 3)
    assert params.prior_tie == pytest.approx(1 / 3)  # (0 tied items + 1) / (1 item + 2)

    # E-step: the class prior is 1/3 each (strict (1 - 1/3) / 2), so it cancels
    a_better = a_x * a_x * r_z  # x, y right; z reversed
    tie = ((1 - e) / 2) ** 3  # everyone broke a true tie
    b_better = r_x * r_x * a_z
    total = a_better + tie + b_better
    posterior = e_step(params, labels)
    assert posterior[0].tolist() == pytest.approx(
        [float(a_better / total), float(tie / total), float(b_better / total)]
    )


def test_em_never_lowers_its_objective(mixed_pool):
    records, _ = mixed_pool
    labels = label_items(records[:300])
    prior = ReliabilityPrior()
    params = m_step(majority_vote(labels), labels, prior)
    values = [log_posterior(params, labels, prior)]
    for _ in range(15):
        params = m_step(e_step(params, labels), labels, prior)
        values.append(log_posterior(params, labels, prior))
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:])), values


def test_confusion_rows_are_probabilities(mixed_pool):
    records, _ = mixed_pool
    labels = label_items(records)
    params = m_step(majority_vote(labels), labels, ReliabilityPrior())
    matrices = params.matrices()
    assert np.allclose(matrices.sum(axis=2), 1.0) and (matrices > 0).all()
    assert params.class_prior().sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- recovery


def test_recovers_good_careless_and_reversed_annotators(mixed_pool):
    records, _ = mixed_pool
    fit = fit_reliability(records)
    assert fit.converged and fit.items == 300 * 6 and fit.shared_items == fit.items
    w = fit.weights()
    for i in range(6):
        good = fit.annotators[f"good-{i}"]
        assert good.weight > 0.8 and good.strict_correct > 0.9 and good.expected_accuracy > 0.9
    assert w["careless-0"] < 0.2 and w["careless-1"] < 0.2
    assert w["reversed-0"] == 0.0 and w["reversed-1"] == 0.0
    for name in ("reversed-0", "reversed-1"):
        assert fit.annotators[name].strict_reversed > 0.9  # recognised as reversed, not as noise
    # the table lists the least reliable first
    assert [row[0] for row in fit.rows()][:4] == sorted(
        ["careless-0", "careless-1", "reversed-0", "reversed-1"],
        key=lambda n: (fit.annotators[n].expected_accuracy, n),
    )


def test_an_annotator_with_few_labels_stays_near_the_prior(mixed_pool):
    records, _ = mixed_pool
    newcomer = record("p0", "newcomer", [["A"], ["B"], ["C"], ["D"]])
    a = fit_reliability([*records, newcomer]).annotators["newcomer"]
    assert a.pairs == 6
    assert 0.3 < a.weight < 0.8  # the prior alone says 4/6 - 1/6 = 0.5; six pairs move it a little


def test_gold_anchors_rescue_a_majority_adversarial_pool():
    kinds = {**{f"good-{i}": "good" for i in range(4)}, **{f"reversed-{i}": "reversed" for i in range(6)}}
    records, golds = simulated_pool(kinds, seed=1)
    unanchored = fit_reliability(records).weights()
    assert all(unanchored[f"good-{i}"] == 0.0 for i in range(4))  # the majority wins without gold
    gold = {pid: gold_tiers(g) for pid, g in list(golds.items())[:30]}  # 10 % of the prompts
    fit = fit_reliability(records, gold)
    assert fit.anchored_items == 30 * 6
    w = fit.weights()
    assert all(w[f"good-{i}"] > 0.8 for i in range(4))
    assert all(w[f"reversed-{i}"] == 0.0 for i in range(6))


def test_gold_may_be_partial_text():
    records = [record("p", "x", [["A"], ["B"], ["C"], ["D"]])]
    labels = label_items(records, {"p": "B > A", "not-ranked": "A > B"})
    anchored = {labels.items[i]: int(labels.anchor[i]) for i in np.flatnonzero(labels.anchored)}
    assert anchored == {("p", "A", "B"): SECOND_BETTER}


def test_no_records_fit_nothing():
    fit = fit_reliability([])
    assert fit.annotators == {} and fit.items == 0 and fit.converged


# ----------------------------------------------------------------------------- invariances


def test_relabelling_candidates_changes_nothing(mixed_pool):
    records, _ = mixed_pool
    rng = random.Random(5)
    relabelled = []
    new_label = {}
    for rec in records:
        if rec["prompt_id"] not in new_label:  # one relabelling per prompt, the same for every annotator
            new_label[rec["prompt_id"]] = dict(zip("ABCD", rng.sample("ABCD", 4)))
        change = new_label[rec["prompt_id"]]
        relabelled.append({**rec, "tiers": [[change[lab] for lab in tier] for tier in rec["tiers"]]})
    assert_same_fit(fit_reliability(records), fit_reliability(relabelled))


def test_renaming_annotators_and_shuffling_records_change_nothing(mixed_pool):
    records, _ = mixed_pool
    rename = {name: f"z{99 - i}" for i, name in enumerate(sorted(MIXED_POOL))}  # reverses the sort order
    renamed = [{**rec, "annotator": rename[rec["annotator"]]} for rec in records]
    random.Random(3).shuffle(renamed)
    assert_same_fit(fit_reliability(records), fit_reliability(renamed), rename=rename.get)


def test_reversing_every_ranking_is_symmetric(mixed_pool):
    """Strict orders are symmetric in the model: reversing every ranking (and the gold) reverses every
    truth and leaves every annotator's reliability as it was."""
    records, golds = mixed_pool
    flipped = [{**copy.deepcopy(rec), "tiers": rec["tiers"][::-1]} for rec in records]
    gold = {pid: gold_tiers(g) for pid, g in list(golds.items())[:20]}
    flipped_gold = {pid: tiers[::-1] for pid, tiers in gold.items()}
    assert_same_fit(fit_reliability(records), fit_reliability(flipped))
    assert_same_fit(fit_reliability(records, gold), fit_reliability(flipped, flipped_gold))
