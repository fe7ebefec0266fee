"""Simulated annotators: noise model against hand-computed and statistical expectations."""

from __future__ import annotations

import json
import math
import random

import pytest

from reward_models.simulate import gold_pair_agreement, sample_tiers, simulate_rankings
from rlhf.scorers import get_scorer


def test_zero_temperature_ranks_by_gold_and_ties_within_threshold():
    rng = random.Random(0)
    # gold: A=0.1 B=0.9 C=0.5 D=0.52 → C and D within 0.05 → B > C = D > A
    assert sample_tiers([0.1, 0.9, 0.5, 0.52], 0.0, 0.05, rng) == [[1], [3, 2], [0]]
    assert sample_tiers([0.1, 0.9, 0.5, 0.52], 0.0, 0.0, rng) == [[1], [3], [2], [0]]
    assert sample_tiers([0.3, 0.3, 0.3], 0.0, 0.0, rng) == [[0, 1, 2]]


def test_pairwise_probability_follows_bradley_terry():
    # Gumbel-max at temperature T gives P(first ≻ second) = σ((s1 - s2) / T).
    rng = random.Random(1)
    n, s1, s2, temp = 20000, 0.3, 0.0, 0.5
    wins = sum(sample_tiers([s1, s2], temp, 0.0, rng)[0] == [0] for _ in range(n))
    expected = 1 / (1 + math.exp(-(s1 - s2) / temp))
    assert abs(wins / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_gold_pair_agreement_hand_computed():
    recs = [
        {"gold": {"A": 1.0, "B": 0.0, "C": 0.5}, "tiers": [["A"], ["C"], ["B"]]},  # 3/3 agree
        {"gold": {"A": 1.0, "B": 0.0}, "tiers": [["B"], ["A"]]},  # 0/1
        {"gold": {"A": 0.0, "B": 0.01}, "tiers": [["A", "B"]]},  # within threshold: skipped
    ]
    assert gold_pair_agreement(recs, 0.05) == pytest.approx(3 / 4)


def _candidates(n=6, k=4):
    texts = [
        "I love this, wonderful and great!",
        "This is terrible and sad.",
        "It is a table.",
        "Nice, good job.",
    ]
    return [
        {
            "prompt_id": f"p{i}",
            "prompt": f"prompt {i}",
            "candidates": [
                {"label": "ABCD"[j], "text": texts[(i + j) % 4], "model": "m", "gen": {}} for j in range(k)
            ],
        }
        for i in range(n)
    ]


def test_simulate_rankings_contract_and_determinism():
    scorer = get_scorer("vader")
    a = simulate_rankings(
        _candidates(), scorer, n_annotators=3, temperature=0.0, tie_threshold=0.0, seed=5, per_prompt=2
    )
    b = simulate_rankings(
        _candidates(), scorer, n_annotators=3, temperature=0.0, tie_threshold=0.0, seed=5, per_prompt=2
    )
    assert [r["ranking"] for r in a] == [r["ranking"] for r in b]
    assert len(a) == 12 and len({(r["prompt_id"], r["annotator"]) for r in a}) == 12
    first = a[0]
    assert set(first) >= {
        "prompt_id",
        "prompt",
        "candidates",
        "ranking",
        "tiers",
        "annotator",
        "flags",
        "created_at",
    }
    # noiseless: the most positive text is ranked first
    best = max(first["gold"], key=first["gold"].get)
    assert first["tiers"][0][0] == best and first["ranking"].startswith(best)
    assert gold_pair_agreement(a, 0.0) == 1.0


def test_rlhf_simulate_cli(in_tmp):
    from rlhf.cli import main

    cand = in_tmp / "cands.jsonl"
    cand.write_text("".join(json.dumps(r) + "\n" for r in _candidates()))
    rc = main(
        [
            "simulate",
            "--candidates",
            str(cand),
            "--n_annotators",
            "2",
            "--tracking.mode",
            "disabled",
            "--out",
            str(in_tmp / "r.jsonl"),
        ]
    )
    assert rc == 0
    lines = (in_tmp / "r.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert json.loads(lines[0])["annotator"] in ("sim-0", "sim-1")


def test_rlhf_simulate_bad_config_exits_2(in_tmp, capsys):
    from rlhf.cli import main

    assert (
        main(["simulate", "--candidates", "x.jsonl", "--per_prompt", "5", "--tracking.mode", "disabled"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per_prompt must be between 1 and n_annotators (3), got 5" in err[0]
    assert (
        main(["simulate", "--candidates", "x.jsonl", "--scorer", "nope", "--tracking.mode", "disabled"]) == 2
    )
