"""Arena pairs, votes and leaderboards (rlhf/arena.py): blind pairs, votes read from rankings of two,
leaderboards equal to the fits they report. The command is tested in tests/experiments/."""

from __future__ import annotations

import pytest

from rlhf.arena import arena_pairs, fit_leaderboard, leaderboards_by_voter, votes_from_rankings
from rlhf.arena_fit import Vote, fit_bradley_terry_davidson, length_controlled_win_rates
from rlhf.errors import UserError

MODELS = ("m1", "m2", "m3")


def _responses(n_prompts: int = 4) -> list[dict]:
    return [
        {
            "prompt_id": f"q{i}",
            "prompt": f"prompt {i}",
            "responses": {
                m: {"text": f"{m} answer {i}" + "." * (i * (k + 1) % 7), "n_tokens": 3, "finished": True}
                for k, m in enumerate(MODELS)
            },
        }
        for i in range(n_prompts)
    ]


def test_pairs_cover_every_model_pair_once_per_prompt_in_a_random_blind_order():
    pairs = arena_pairs(_responses(40), seed=3)
    assert len(pairs) == 40 * 3
    seen = {}
    for pair in pairs:
        models = [c["model"] for c in pair["candidates"]]
        assert [c["label"] for c in pair["candidates"]] == ["A", "B"]
        assert len(set(models)) == 2
        assert not any(m in pair["prompt_id"] for m in MODELS)  # the id names no model
        assert all(c["text"].startswith(c["model"]) for c in pair["candidates"])  # text stays with its model
        seen.setdefault(frozenset(models), []).append(models[0])
    assert {len(v) for v in seen.values()} == {40}
    for firsts in seen.values():  # which model is A is a coin flip, not a rule
        share = sum(f == min(firsts) for f in firsts) / len(firsts)
        assert 0.2 < share < 0.8
    assert arena_pairs(_responses(40), seed=3) == pairs  # seeded
    assert arena_pairs(_responses(40), seed=4) != pairs


def _pair(text_a: str, text_b: str, model_a: str = "x", model_b: str = "y", prompt: str = "p") -> dict:
    return {
        "prompt_id": f"{prompt}-p1",
        "prompt": prompt,
        "candidates": [
            {"label": "A", "text": text_a, "model": model_a, "gen": {"finished": True}},
            {"label": "B", "text": text_b, "model": model_b, "gen": {"finished": True}},
        ],
    }


def test_votes_read_outcomes_models_lengths_and_group_by_prompt():
    records = [
        {**_pair("aaaa", "bb", "x", "y", "p1"), "ranking": "A > B", "tiers": [["A"], ["B"]]},
        {**_pair("aaaa", "bb", "y", "x", "p1"), "ranking": "A > B", "tiers": [["A"], ["B"]]},
        {**_pair("a", "bbb", "x", "z", "p2"), "ranking": "A = B", "tiers": [["A", "B"]]},
        {**_pair("a", "bbb", "z", "y", "p2"), "ranking": "B > A", "tiers": [["B"], ["A"]]},
    ]
    assert votes_from_rankings(records) == [
        Vote("x", "y", "a", "p1", 4.0, 2.0),
        Vote("y", "x", "a", "p1", 4.0, 2.0),
        Vote("x", "z", "tie", "p2", 1.0, 3.0),
        Vote("z", "y", "b", "p2", 1.0, 3.0),
    ]
    bad = {**_pair("a", "b", "x", "x"), "ranking": "A > B"}
    with pytest.raises(UserError, match=r"vote 2 .*two different named models"):
        votes_from_rankings([records[0], bad])


def _arena_votes(n_prompts: int = 60) -> list[Vote]:
    # m1 > m2 > m3 most of the time, with ties; lengths vary
    import random

    rng = random.Random(0)
    strength = {"m1": 1.0, "m2": 0.0, "m3": -1.0}
    votes = []
    for i in range(n_prompts):
        for a, b in (("m1", "m2"), ("m2", "m3"), ("m1", "m3")):
            d = strength[a] - strength[b] + rng.gauss(0, 1)
            outcome = "tie" if abs(d) < 0.3 else ("a" if d > 0 else "b")
            votes.append(Vote(a, b, outcome, f"p{i}", rng.randint(10, 90), rng.randint(10, 90)))
    return votes


def test_the_leaderboard_is_the_fit_of_its_votes():
    votes = _arena_votes()
    board = fit_leaderboard(votes, "judge", baseline="m3", n_boot=200, seed=1)
    ratings = fit_bradley_terry_davidson(votes, n_boot=200, seed=1)
    lc = length_controlled_win_rates(votes, "m3", n_boot=200, seed=1)
    rows = board.rows()
    assert [r["model"] for r in rows] == ["m1", "m2", "m3"]
    for row in rows:
        assert row["rating"] == pytest.approx(ratings.rating(row["model"]).value)
        assert row["ci_low"] < row["rating"] < row["ci_high"]
    assert rows[0]["lc_win_rate"] == pytest.approx(lc["m1"].lc_win_rate.value)
    assert rows[-1]["lc_win_rate"] is None  # the baseline against itself
    assert board.tie_rate == pytest.approx(sum(v.outcome == "tie" for v in votes) / len(votes))
    assert fit_leaderboard(votes, "judge", n_boot=0).baseline == "m3"  # default: the lowest rated
    with pytest.raises(UserError, match="baseline 'm9' is not in the arena"):
        fit_leaderboard(votes, "judge", baseline="m9", n_boot=0)
    with pytest.raises(UserError, match="cannot rate"):
        fit_leaderboard([Vote("m1", "m2", "tie", "p")], "judge", n_boot=0)


def test_leaderboards_by_voter_keeps_voters_apart():
    def by_length(pair: dict, longer_wins: bool, voter: str | None) -> dict:
        a, b = (len(c["text"]) for c in pair["candidates"])
        better_is_a = (a > b) == longer_wins
        return {
            **pair,
            "ranking": "A = B" if a == b else ("A > B" if better_is_a else "B > A"),
            "voter": voter,
        }

    pairs = arena_pairs(_responses(30), seed=0)
    records = [by_length(p, True, "longer") for p in pairs] + [by_length(p, False, None) for p in pairs]
    indifferent = [{**p, "ranking": "A = B", "voter": "indifferent"} for p in pairs]
    boards, unrated = leaderboards_by_voter(records + indifferent, None, n_boot=0)
    assert [b.voter for b in boards] == ["longer", "human"]  # a vote naming no voter is a person's
    # a voter whose votes cannot rate the models is set aside with its reason, the others kept
    assert list(unrated) == ["indifferent"] and "every vote is a tie" in unrated["indifferent"]
    assert [b.ratings.n_votes for b in boards] == [90, 90]
    longer, shorter = (b.rows()[0]["model"] for b in boards)
    assert longer != shorter  # opposite judges, opposite winners


# ----------------------------------------------------------------------------- end to end
