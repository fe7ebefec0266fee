"""The ranking grammar of docs/rankings.md: hand-checked cases, exhaustive small K, properties."""

from __future__ import annotations

import dataclasses
import itertools
import math
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.errors import UserError
from rlhf.rankings import (
    RANKING_ERROR_CODES,
    Ranking,
    RankingError,
    format_tiers,
    labels_for,
    parse_ranking,
)

ABCD = ["A", "B", "C", "D"]


# ----------------------------------------------------------------------------- hand-checked


def test_the_worked_example_of_rankings_md():
    r = parse_ranking("C > B = D > A", ABCD)
    assert r.tiers == (("C",), ("B", "D"), ("A",))
    assert str(r) == "C > B = D > A"
    assert r.labels == ("A", "B", "C", "D")
    # docs/rankings.md, "Derived pairs": the five strict pairs and the one tie, in this order.
    assert r.pairs() == [("C", "B"), ("C", "D"), ("C", "A"), ("B", "A"), ("D", "A")]
    assert r.ties() == [("B", "D")]
    assert [r.tier_of(x) for x in "ABCD"] == [2, 1, 0, 1]
    assert r.tier_of("d") == 1
    assert not r.all_tied and r.complete
    with pytest.raises(KeyError):
        parse_ranking("C > B", ABCD, complete=False).tier_of("A")


@pytest.mark.parametrize(
    "text", ["c>b=d>a", " C > B = D > A ", "C>D=B>A", "c \t>\n d = b >a", "C > D = B > A"]
)
def test_case_and_white_space_do_not_matter(text):
    r = parse_ranking(text, ABCD)
    assert str(r) == "C > B = D > A"
    assert r == parse_ranking("C > B = D > A", ABCD)


def test_all_tied_is_valid_and_flagged():
    r = parse_ranking("A = B = C = D", ABCD)
    assert r.all_tied
    assert r.pairs() == []
    assert len(r.ties()) == 6
    assert not parse_ranking("A = B", ABCD, complete=False).all_tied  # a draft is not "everything tied"


def test_partial_rankings_are_drafts():
    r = parse_ranking("c > b", ABCD, complete=False)
    assert str(r) == "C > B" and not r.complete and r.ranked == ("C", "B")
    assert r.pairs() == [("C", "B")]
    with pytest.raises(RankingError) as err:
        parse_ranking("c > b", ABCD)
    assert err.value.code == "missing_label"


def test_ranking_is_immutable_hashable_and_canonical():
    r = Ranking.from_tiers([["C"], ["D", "b"], ["A"]], ABCD)
    assert r.tiers == (("C",), ("B", "D"), ("A",))
    assert r == parse_ranking("C > B = D > A", ABCD)
    assert len({r, parse_ranking("c>d=b>a", ABCD)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.tiers = ()  # type: ignore[misc]


def test_format_tiers_and_labels_for():
    assert format_tiers([["C"], ["d", "B"], ["A"]]) == "C > B = D > A"
    assert labels_for(2) == ["A", "B"]
    assert labels_for(26) == list(string.ascii_uppercase)
    for bad in (1, 27, 0, True, "4"):
        with pytest.raises(UserError):
            labels_for(bad)
    assert parse_ranking("b > a", 2) == parse_ranking("B > A", ["A", "B"])  # labels given as K


def test_bad_labels_argument_is_a_caller_bug():
    for bad in ([], ["A", "A"], ["a", "b"], ["AB", "C"]):
        with pytest.raises(ValueError):
            parse_ranking("A", bad)


# ----------------------------------------------------------------------------- errors (docs/rankings.md table)

ERROR_CASES = [
    # text, code, 1-based position or None, substrings the message must contain
    ("", "empty", None, ["empty"]),
    ("   ", "empty", None, ["empty"]),
    ("\n\t", "empty", None, ["empty"]),
    ("C >> B", "syntax", 4, ["'>'", "position 4"]),
    ("> A", "syntax", 1, ["'>'", "position 1", "starts with a label"]),
    ("A >", "syntax", 3, ["'>'", "position 3", "label must follow"]),
    ("A > B =", "syntax", 7, ["'='", "position 7"]),
    ("A < B", "syntax", 3, ["'<'", "position 3", "rank best first with >"]),
    ("A >= B", "syntax", 4, ["'='", "position 4", "'>=' is not an operator"]),
    ("A => B", "syntax", 4, ["'>'", "position 4", "'=>' is not an operator"]),
    ("A, B", "syntax", 2, ["','", "position 2", "not ','"]),
    ("AB > C", "syntax", 2, ["'B'", "position 2", "single letter"]),
    ("A B > C", "syntax", 3, ["'B'", "position 3"]),
    ("Ａ > B", "syntax", 1, ["'Ａ'", "position 1", "full-width", "'A'"]),
    ("A ＞ B", "syntax", 3, ["'＞'", "full-width", "'>'"]),
    ("1 > 2", "syntax", 1, ["'1'", "letters"]),
    ("é > A", "syntax", 1, ["'é'", "A–Z"]),
    ("A ≥ B", "syntax", 3, ["'≥'"]),
    ("E", "unknown_label", 1, ["E", "A, B, C, D"]),
    ("C > B = D > e", "unknown_label", 13, ["E", "A, B, C, D"]),
    ("A > B > A", "duplicate_label", 9, ["A", "more than once"]),
    ("A = A", "duplicate_label", 5, ["A", "more than once"]),
    ("C > B", "missing_label", None, ["A, D", "missing"]),
]


@pytest.mark.parametrize(("text", "code", "position", "parts"), ERROR_CASES)
def test_every_error_of_rankings_md_has_its_code_and_names_the_part(text, code, position, parts):
    with pytest.raises(RankingError) as info:
        parse_ranking(text, ABCD)
    err = info.value
    assert err.code == code
    assert isinstance(err, UserError)
    assert err.position == position
    message = str(err)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_a_worst_first_ranking_gets_its_best_first_spelling():
    with pytest.raises(RankingError) as err:
        parse_ranking("a < b = d < c", ABCD)
    assert "did you mean 'C > B = D > A'?" in str(err.value)
    with pytest.raises(RankingError) as err:
        parse_ranking("A < B > C", ABCD)
    assert "did you mean" not in str(err.value)


def test_error_order_syntax_before_labels():
    with pytest.raises(RankingError) as err:
        parse_ranking("E > E >", ABCD)
    assert err.value.code == "syntax"
    with pytest.raises(RankingError) as err:
        parse_ranking("E > A > A", ABCD)
    assert err.value.code == "unknown_label"


def test_offending_labels_are_exposed_for_a_ui():
    with pytest.raises(RankingError) as err:
        parse_ranking("A > F > E", ABCD)
    assert err.value.offending == ("F", "E")
    with pytest.raises(RankingError) as err:
        parse_ranking("B", ABCD)
    assert err.value.offending == ("A", "C", "D")


def test_a_non_string_is_a_syntax_error():
    with pytest.raises(RankingError) as err:
        parse_ranking(["A", "B"], ABCD)  # type: ignore[arg-type]
    assert err.value.code == "syntax"


@pytest.mark.parametrize(
    ("tiers", "code"),
    [
        ([], "empty"),
        ([["A"], []], "syntax"),
        ("A > B", "syntax"),
        ([["A", "BC"]], "syntax"),
        ([["A", 1]], "syntax"),
        ([["A", "E"], ["B", "C", "D"]], "unknown_label"),
        ([["A"], ["B", "A"], ["C", "D"]], "duplicate_label"),
        ([["A"], ["B"]], "missing_label"),
    ],
)
def test_from_tiers_validates(tiers, code):
    with pytest.raises(RankingError) as err:
        Ranking.from_tiers(tiers, ABCD)
    assert err.value.code == code


# ----------------------------------------------------------------------------- exhaustive small K


def fubini(k: int) -> int:
    """Number of ordered set partitions (weak orders) of k items: 1, 1, 3, 13, 75, ..."""
    a = [1]
    for n in range(1, k + 1):
        a.append(sum(math.comb(n, i) * a[n - i] for i in range(1, n + 1)))
    return a[k]


def expected_tiers(perm, ops):
    tiers = [[perm[0]]]
    for lab, op in zip(perm[1:], ops):
        if op == ">":
            tiers.append([lab])
        else:
            tiers[-1].append(lab)
    return tuple(tuple(sorted(t)) for t in tiers)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_permutation_with_every_tie_pattern(k):
    labels = labels_for(k)
    distinct = set()
    for perm in itertools.permutations(labels):
        for ops in itertools.product(">=", repeat=k - 1):
            text = perm[0] + "".join(f" {op} {lab}" for op, lab in zip(ops, perm[1:]))
            r = parse_ranking(text, labels)
            assert r.tiers == expected_tiers(perm, ops)
            assert parse_ranking(str(r), labels) == r
            assert parse_ranking(text.lower().replace(" ", ""), labels) == r
            assert Ranking.from_tiers(r.tiers, labels) == r
            assert r.all_tied == all(op == "=" for op in ops)
            check_pairs_cover_every_pair_once(r, labels)
            distinct.add(r)
    assert len(distinct) == fubini(k)  # 3, 13, 75: every weak order reached


def check_pairs_cover_every_pair_once(r: Ranking, labels):
    pairs, ties = r.pairs(), r.ties()
    assert len(pairs) + len(ties) == math.comb(len(labels), 2)
    unordered = [frozenset(p) for p in pairs] + [frozenset(t) for t in ties]
    assert len(set(unordered)) == len(unordered)
    for w, lo in pairs:
        assert r.tier_of(w) < r.tier_of(lo)
    for a, b in ties:
        assert a < b and r.tier_of(a) == r.tier_of(b)


# ----------------------------------------------------------------------------- properties


@st.composite
def rankings(draw, min_k=2, max_k=26):
    k = draw(st.integers(min_k, max_k))
    labels = labels_for(k)
    perm = draw(st.permutations(labels))
    ops = draw(st.lists(st.sampled_from(">="), min_size=k - 1, max_size=k - 1))
    return labels, perm, ops


@settings(max_examples=200, deadline=None)
@given(rankings(), st.data())
def test_canonical_round_trip_and_pair_count(spec, data):
    labels, perm, ops = spec
    space = st.sampled_from(["", " ", "  ", "\t", "\n"])
    parts = [
        data.draw(space) + (lab.lower() if data.draw(st.booleans()) else lab) + data.draw(space)
        for lab in perm
    ]
    text = parts[0] + "".join(op + p for op, p in zip(ops, parts[1:]))
    r = parse_ranking(text, labels)
    assert r.tiers == expected_tiers(perm, ops)
    canonical = str(r)
    assert parse_ranking(canonical, labels) == r
    assert str(parse_ranking(canonical, labels)) == canonical
    assert canonical == format_tiers(r.tiers)
    check_pairs_cover_every_pair_once(r, labels)


@settings(max_examples=100, deadline=None)
@given(rankings(min_k=3, max_k=10), st.data())
def test_partial_rankings_round_trip(spec, data):
    labels, perm, ops = spec
    n = data.draw(st.integers(1, len(perm) - 1))
    text = perm[0] + "".join(op + lab for op, lab in zip(ops[: n - 1], perm[1:n]))
    r = parse_ranking(text, labels, complete=False)
    assert set(r.ranked) == set(perm[:n]) and not r.complete
    assert parse_ranking(str(r), labels, complete=False) == r
    with pytest.raises(RankingError) as err:
        parse_ranking(text, labels)
    assert err.value.code == "missing_label"
    assert set(err.value.offending) == set(perm[n:])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ABCDEabcz >=<,;Ａ1 \t")) | st.characters(), max_size=20))
def test_any_text_parses_or_raises_a_ranking_error(text):
    try:
        r = parse_ranking(text, ABCD, complete=False)
    except RankingError as err:
        assert err.code in RANKING_ERROR_CODES
        assert str(err)
        if err.code == "syntax" and err.position is not None:
            assert 1 <= err.position <= len(text)
    else:
        assert parse_ranking(str(r), ABCD, complete=False) == r
