"""Agreement statistics against values worked out by hand, and the ranking control's logic."""

from __future__ import annotations

import math

import pytest

from annotation_app.agreement import (
    agreement_report,
    kendall_tau_b,
    krippendorff_alpha_ordinal,
    pair_classes,
    pairwise_agreement,
    tie_rate,
)
from annotation_app.control import canonical_partial, single_best
from annotation_app.text import safe_markdown, visible_text


def test_kendall_tau_b_by_hand():
    # Identical strict orders: τ = 1; reversed: -1.
    assert kendall_tau_b([["A"], ["B"], ["C"]], [["A"], ["B"], ["C"]]) == pytest.approx(1.0)
    assert kendall_tau_b([["A"], ["B"], ["C"]], [["C"], ["B"], ["A"]]) == pytest.approx(-1.0)
    # x = A>B>C (ranks 0,1,2), y = A=B>C (0,0,1). Pairs: AB concordant? x differs, y tied → neither;
    # AC concordant, BC concordant: nc=2, nd=0, ties only in y: t_y=1.
    # τ_b = (2 - 0) / sqrt((3 - 0) * (3 - 1)) = 2 / sqrt(6)
    assert kendall_tau_b([["A"], ["B"], ["C"]], [["A", "B"], ["C"]]) == pytest.approx(2 / math.sqrt(6))
    # all-tied ranking: no order, τ undefined
    assert math.isnan(kendall_tau_b([["A", "B", "C"]], [["A"], ["B"], ["C"]]))


def test_krippendorff_alpha_binary_by_hand():
    # units (1,1), (2,2), (1,2): o11 = 2, o22 = 2, o12 = o21 = 1; n1 = n2 = 3, n = 6.
    # δ²(1,2) = (n1 + n2 - (n1 + n2)/2)² = 9; D_o = 2·9 = 18; D_e = 2·3·3·9 = 162
    # α = 1 - (n - 1) D_o / D_e = 1 - 5·18/162 = 4/9
    alpha = krippendorff_alpha_ordinal({"u1": [1, 1], "u2": [2, 2], "u3": [1, 2]})
    assert alpha == pytest.approx(4 / 9)


def test_krippendorff_alpha_ordinal_three_levels_by_hand():
    # units (1,2), (2,3), (1,1), (3,3): n1 = 3, n2 = 2, n3 = 3, n = 8.
    # δ²(1,2) = (3 + 2 - 2.5)² = 6.25, δ²(2,3) = (2 + 3 - 2.5)² = 6.25, δ²(1,3) = (8 - 3)² = 25.
    # D_o = 4 · 6.25 = 25; D_e = 2 (3·2·6.25 + 2·3·6.25 + 3·3·25) = 600; α = 1 - 7·25/600 = 17/24
    alpha = krippendorff_alpha_ordinal({"a": [1, 2], "b": [2, 3], "c": [1, 1], "d": [3, 3]})
    assert alpha == pytest.approx(17 / 24)
    # Ordinal: only the order of values matters (values 0, 10, 11 behave like 1, 2, 3).
    assert krippendorff_alpha_ordinal(
        {"a": [0, 10], "b": [10, 11], "c": [0, 0], "d": [11, 11]}
    ) == pytest.approx(17 / 24)


def test_krippendorff_alpha_edge_cases():
    assert krippendorff_alpha_ordinal({"a": [1, 1], "b": [2, 2]}) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha_ordinal({"a": [1], "b": [2]}))  # nothing pairable
    assert math.isnan(krippendorff_alpha_ordinal({"a": [1, 1], "b": [1, 1]}))  # no variation
    # A unit with three coders: weights 1/(m-1) = 1/2 per ordered pair.
    # (1,1,2): o11 = 1, o12 = o21 = 1; plus (2,2): o22 = 2 → n1 = 2, n2 = 3, n = 5
    # δ²(1,2) = (5 - 2.5)² = 6.25; D_o = 2·6.25 = 12.5; D_e = 2·2·3·6.25 = 75; α = 1 - 4·12.5/75 = 1/3
    assert krippendorff_alpha_ordinal({"a": [1, 1, 2], "b": [2, 2]}) == pytest.approx(1 / 3)


def test_pairwise_classes_agreement_and_tie_rate():
    x = [["C"], ["B", "D"], ["A"]]
    assert pair_classes(x) == {
        ("A", "B"): -1,
        ("A", "C"): -1,
        ("A", "D"): -1,
        ("B", "C"): -1,
        ("B", "D"): 0,
        ("C", "D"): 1,
    }
    y = [["C"], ["B"], ["D"], ["A"]]  # differs only on (B, D): tie vs B wins
    assert pairwise_agreement(x, y) == (5, 6)
    assert tie_rate([x, y]) == pytest.approx(1 / 12)


def test_agreement_report_reports_nan_pairs_separately():
    recs = [
        {"prompt_id": "p", "annotator": "a", "tiers": [["A"], ["B"], ["C"]]},
        {"prompt_id": "p", "annotator": "b", "tiers": [["A"], ["B"], ["C"]]},
        {"prompt_id": "p", "annotator": "c", "tiers": [["A", "B", "C"]]},
        {"prompt_id": "q", "annotator": "a", "tiers": [["A"], ["B"]]},
    ]
    rep = agreement_report(recs)
    assert rep["kendall_tau_b_mean"] == pytest.approx(1.0)  # the two NaN pairs are not averaged in
    assert rep["kendall_tau_b_pairs"] == 1 and rep["kendall_tau_b_nan_pairs"] == 2
    assert rep["prompts_with_2plus"] == 1
    assert rep["pairs_compared"] == 9 and rep["pairwise_agreement"] == pytest.approx(3 / 9)


def test_typed_text_to_the_boards_canonical_ranking_and_the_single_best():
    labels = list("ABCD")
    assert canonical_partial("c > b = d > a", labels) == ("C > B = D > A", "")
    assert canonical_partial("b = d", labels) == ("B = D", "")  # partial fine
    assert canonical_partial("  ", labels) == ("", "")
    text, err = canonical_partial("C > E", labels)
    assert text is None and "unknown label E" in err
    for typed in ("A > B = C > D", "D = A > C > B", "A = B = C = D"):
        assert canonical_partial(typed, labels)[0] == text_to_canonical(typed)
    assert single_best("c > a = b", labels) == ("C", "")
    assert (
        single_best("a = b > c", labels)[0] is None and "tie (A = B)" in single_best("a = b > c", labels)[1]
    )
    assert single_best("", labels)[0] is None


def text_to_canonical(text: str) -> str:
    from rlhf.rankings import parse_ranking

    return str(parse_ranking(text, list("ABCD")))


def test_untrusted_text_is_made_visible_not_rendered():
    assert visible_text("abc\u202edcba\u200b") == "abc⟦U+202E⟧dcba⟦U+200B⟧"
    assert visible_text("a\x01b\tc\nd\r\n") == "a⟦U+0001⟧b\tc\nd\r\n"  # tabs and newlines stay
    md = safe_markdown('<img src=x onerror="alert(1)"> ![cat](http://evil/x.png) **ok**')
    assert "<img" not in md and "&lt;img" in md
    assert "![" not in md and "[image: cat] (`http://evil/x.png`)" in md
