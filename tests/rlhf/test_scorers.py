"""Gold scorers: each kind on hand-checked inputs, sums, and clear errors for bad specs."""

from __future__ import annotations

import sys

import pytest

from rlhf.errors import MissingExtraError
from rlhf.scorers import ScorerError, get_scorer


def user_scorer(prompts, responses):
    return [float(len(r)) for r in responses]


def test_vader_orders_sentiment():
    s = get_scorer("vader")
    good, bad, neutral = s(
        ["p"] * 3, ["I love this, it is wonderful!", "This is awful and I hate it.", "It is a chair."]
    )
    assert good > 0.5 > neutral > -0.5 > bad
    assert neutral == 0.0


def test_length_scorer_hand_values():
    s = get_scorer("length:target=4")
    assert s(["p", "p"], ["one two three four", "one two"]) == [0.0, -0.5]
    assert get_scorer("length:target=3,unit=chars")(["p"], ["abcdef"]) == [-1.0]


def test_keywords_whole_words_case_insensitive():
    s = get_scorer("keywords:good=thanks|great,bad=sorry")
    assert s(["p"] * 3, ["Thanks, GREAT!", "sorry, thanksgiving", "greatness"]) == [2.0, -1.0, 0.0]


def test_module_function_and_python_file(tmp_path):
    s = get_scorer("tests.rlhf.test_scorers:user_scorer")
    assert s(["p"], ["abc"]) == [3.0]
    f = tmp_path / "mine.py"
    f.write_text("def score(prompts, responses):\n    return [1.5 for _ in responses]\n")
    assert get_scorer(f"python:{f}:score")(["p", "q"], ["a", "b"]) == [1.5, 1.5]


def test_weighted_sum():
    s = get_scorer("2*length:target=2 + 0.5*keywords:good=yes")
    assert s(["p"], ["yes yes yes yes"]) == [2 * -1.0 + 0.5 * 1.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty scorer spec"),
        ("sentiment", "unknown scorer 'sentiment'; valid kinds"),
        ("length:target=abc", "target must be a number"),
        ("length:size=3", "unknown option 'size'"),
        ("keywords:", "give good="),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("tests.rlhf.test_scorers:nothing_here", "'nothing_here' is not a callable"),
        ("python:/nonexistent/file.py:fn", "scorer file not found"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ScorerError, match=message):
        get_scorer(spec)


def test_callable_must_return_one_float_per_response(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def short(p, r):\n    return [1.0]\n\ndef nan(p, r):\n    return [float('nan')] * len(r)\n")
    with pytest.raises(ScorerError, match="returned 1 scores for 2 responses"):
        get_scorer(f"python:{f}:short")(["a", "b"], ["a", "b"])
    with pytest.raises(ScorerError, match="non-finite"):
        get_scorer(f"python:{f}:nan")(["a"], ["a"])


def test_a_missing_optional_package_names_the_extra_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)  # import raises ImportError
    with pytest.raises(
        MissingExtraError, match=r"the vader scorer needs the vaderSentiment package.*rlhf-lab\[vader\]"
    ):
        get_scorer("vader")
