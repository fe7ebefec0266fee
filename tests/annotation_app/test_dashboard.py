"""The admin dashboard's figures, computed from records (no store, no server)."""

from __future__ import annotations

import pytest

from annotation_app import dashboard


def record(
    prompt: str, annotator: str, order: str, seconds: float | None = 5.0, at: str = "2026-01-01T00:00:00Z"
):
    return {
        "prompt_id": prompt,
        "annotator": annotator,
        "ranking": order,
        "tiers": [tier.split(" = ") for tier in order.split(" > ")],
        "candidates": [{"label": lab, "text": lab} for lab in "ABCD"],
        "created_at": at,
        "time_spent": seconds,
    }


def pool(n_prompts: int = 20) -> list[dict]:
    """Two annotators who agree and one who ranks everything backwards."""
    return [
        record(f"p{i}", who, "D > C > B > A" if who == "dev" else "A > B > C > D")
        for i in range(n_prompts)
        for who in ("ana", "ben", "dev")
    ]


def stats_for(names) -> dict:
    return {"annotators": [{"username": n, "submitted": 20, "skipped": 0} for n in names]}


def test_per_annotator_agreement_and_reliability_single_out_the_reversed_annotator():
    rows = {
        row[0]: dict(zip(dashboard.PER_ANNOTATOR_COLUMNS, row))
        for row in dashboard.per_annotator(stats_for(["ana", "ben", "dev"]), pool())
    }
    # ana agrees with ben on all 6 pairs of a prompt and with dev on none: 6 of 12 per prompt
    assert rows["ana"]["agreement_with_others"] == 0.5 and rows["ana"]["pairs_compared"] == 240
    assert rows["dev"]["agreement_with_others"] == 0.0
    assert rows["ana"]["training_weight"] > 0.9 and rows["dev"]["training_weight"] == 0.0
    assert rows["ana"]["items_per_hour"] == 720.0  # 20 items in 100 s of recorded time


def test_no_overlap_means_no_reliability_and_no_interval():
    recs = [record(f"p{i}", "ana" if i % 2 else "ben", "A > B > C > D") for i in range(10)]
    rows = dashboard.per_annotator(stats_for(["ana", "ben"]), recs)
    assert all(row[-2:] == [None, None] for row in rows)
    assert all(row[dashboard.PER_ANNOTATOR_COLUMNS.index("agreement_95ci")] == "" for row in rows)


def test_seconds_histogram_and_progress_by_hand():
    recs = [
        record("p0", "ana", "A > B > C > D", s) for s in (0.0, 9.9, 10.0, 45.0, 299.0, 300.0, 1000.0, None)
    ]
    assert dashboard.seconds_histogram(recs) == [
        ["0–10 s", 2],
        ["10–20 s", 1],
        ["20–30 s", 0],
        ["30–60 s", 1],
        ["60–120 s", 0],
        ["120–300 s", 1],
        ["300+ s", 2],
    ]
    progress = dashboard.progress_over_time(
        [
            record("p0", "ana", "A > B", at="2026-01-01T00:00:09Z"),
            record("p1", "ana", "A > B", at="2026-01-01T00:00:01Z"),
        ]
    )
    assert [n for _, n in progress] == [1, 2] and progress[0][0] < progress[1][0]


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    recs = pool() + [record(f"p{i}", "eve", "A > B > D > C") for i in range(20)]
    headline = {
        row[0]: row
        for row in dashboard.headline(
            {
                "prompts": [{"quorum": 4, "submitted": 4}] * 20,
                "complete_prompts": 20,
                "median_seconds_per_item": 5.0,
            },
            recs,
        )
    }
    value, interval = headline["Kendall τ-b between annotators"][1:]
    assert headline["rankings done / needed"][1] == "80 / 80 (100 %)"
    # every prompt has the same four rankings, so every resample gives the same τ: a zero-width interval
    assert interval == f"[{value}, {value}]"
    assert (
        dashboard.headline(
            headline and {"prompts": [], "complete_prompts": 0, "median_seconds_per_item": float("nan")}, []
        )[0][1]
        == "0 / 0"
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_the_same_seed_gives_the_same_interval(seed):
    recs = [
        record(f"p{i}", who, order)
        for i in range(15)
        for who, order in (("ana", "A > B > C > D"), ("ben", "A > C > B > D" if i % 3 else "B > A > C > D"))
    ]
    stat = lambda rs: (dashboard.agreement.agreement_report(rs)["pairwise_agreement"],)  # noqa: E731
    assert dashboard.bootstrap_over_prompts(recs, stat, seed=seed) == dashboard.bootstrap_over_prompts(
        recs, stat, seed=seed
    )


def test_cohen_kappa_by_hand():
    from annotation_app.agreement import cohen_kappa, proposal_outcomes

    # 10 units: agree on 8; rater a says + 6 times, b says + 5 times (classes + and 0)
    pairs = [(1, 1)] * 5 + [(0, 0)] * 3 + [(1, 0)] * 1 + [(0, 1)] * 0 + [(1, 0)] * 1
    # p_o = 0.8; a: + 7, 0 3; b: + 5, 0 5; p_e = (7*5 + 3*5) / 100 = 0.5; κ = 0.3 / 0.5 = 0.6
    assert cohen_kappa(pairs) == pytest.approx(0.6)
    assert cohen_kappa([]) != cohen_kappa([])  # NaN: nothing to compare
    assert cohen_kappa([(0, 0), (0, 0)]) != cohen_kappa([(0, 0)])  # NaN: chance agreement is perfect
    assert proposal_outcomes([["A"], ["B", "C"]], [["B"], ["A"], ["C"]]) == [(1, -1), (1, 1), (0, 1)]


def test_proposal_rows_and_headline():
    proposals = {
        "p0": {"ranking": "A > B > C > D", "source": "vader"},
        "p1": {"ranking": "D > C > B > A", "source": "vader"},
    }
    recs = [record(f"p{i}", who, "A > B > C > D") for i in range(2) for who in ("ana", "ben")]
    rows = {row[0]: row for row in dashboard.proposal_rows(proposals, recs)}
    assert rows["p0"][1:4] == ["A > B > C > D", 2, 1.0] and rows["p1"][3] == 0.0
    headline = dashboard.proposal_headline(proposals, recs)
    assert headline[0][0].endswith("vader") and headline[1][1] == "0.000"  # τ-b: +1 on p0, -1 on p1
    assert dashboard.proposal_headline({}, recs) == []
