"""Annotators' edits of the best response: the rankings contract's ``edit`` / ``edit_of`` and
``rlhf export --format demonstrations``, read back by ``load_demonstrations`` and trained on by
``rlhf sft`` (rlhf/contracts.py, rlhf/export.py; docs/rankings.md "Edits")."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.contracts import load_demonstrations, load_rankings, validate_ranking
from rlhf.datafiles import DataError, write_jsonl
from rlhf.export import build_export, rankings_to_demonstrations, write_export

CHAT = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is a prime number?"},
    {"role": "assistant", "content": "A whole number with exactly two divisors."},
    {"role": "user", "content": "Give an example."},
]


def ranking(pid: str, text: str, k: int = 3, prompt=None, **extra) -> dict:
    """A rankings record whose candidate X says ``answer X to <pid>``."""
    return {
        "prompt_id": pid,
        "prompt": prompt if prompt is not None else f"question {pid}",
        "candidates": [{"label": lab, "text": f"answer {lab} to {pid}"} for lab in "ABCDE"[:k]],
        "ranking": text,
        "annotator": "ann1",
        **extra,
    }


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------- the contract


def test_an_edit_of_the_top_candidate_is_accepted_and_kept():
    clean, problems = validate_ranking(ranking("p1", "b > a > c", edit="Fixed.", edit_of="B"))
    assert problems == []
    assert (clean["edit"], clean["edit_of"], clean["ranking"]) == ("Fixed.", "B", "B > A > C")
    # Null is absent: a ranking without an edit is unchanged by these fields.
    clean, problems = validate_ranking(ranking("p1", "B > A > C", edit=None, edit_of=None))
    assert problems == [] and clean["edit"] is None and clean["edit_of"] is None


@pytest.mark.parametrize(
    ("extra", "text", "field", "words"),
    [
        ({"edit": "Fixed."}, "B > A > C", "edit_of", "missing: give the label"),
        ({"edit_of": "B"}, "B > A > C", "edit", "missing: `edit_of` names"),
        ({"edit": "", "edit_of": "B"}, "B > A > C", "edit", "is empty"),
        ({"edit": "  \n", "edit_of": "B"}, "B > A > C", "edit", "is empty"),
        ({"edit": 5, "edit_of": "B"}, "B > A > C", "edit", "must be a string, got an integer"),
        ({"edit": "Fixed.", "edit_of": 1}, "B > A > C", "edit_of", "must be a candidate label like 'A'"),
        (
            {"edit": "Fixed.", "edit_of": "E"},
            "B > A > C",
            "edit_of",
            "'E' is not a candidate label (A, B, C)",
        ),
        ({"edit": "Fixed.", "edit_of": "A"}, "B > A > C", "edit_of", "the top-ranked candidate is 'B'"),
        ({"edit": "Fixed.", "edit_of": "A"}, "A = B > C", "edit_of", "top tier ties A = B"),
    ],
)
def test_bad_edits_are_rejected_naming_the_field(extra, text, field, words):
    clean, problems = validate_ranking(ranking("p1", text, **extra))
    assert clean is None
    assert [f for f, _ in problems] == [field]
    assert words in problems[0][1]


def test_every_bad_edit_is_reported_with_its_row_number(tmp_path):
    rows = [
        ranking("p1", "B > A > C", edit="Fixed.", edit_of="B"),
        ranking("p2", "B > A > C", edit="Fixed.", edit_of="C"),
        ranking("p3", "A > B > C"),
        ranking("p4", "A > B > C", edit=["not", "text"], edit_of="A"),
    ]
    with pytest.raises(DataError) as err:
        load_rankings(write_jsonl(tmp_path / "r.jsonl", rows))
    assert [(e.row, e.field) for e in err.value.errors] == [(2, "edit_of"), (4, "edit")]
    assert "2 bad rows" in str(err.value) and "line 4: edit: must be a string, got a list" in str(err.value)


# ----------------------------------------------------------------------------- the export


def edited_rankings() -> list[dict]:
    """Two annotators edit p1, one edits the chat p2, nobody edits p3; p4 is in the eval split."""
    return [
        ranking("p1", "B > A > C", edit="Fixed B.", edit_of="B"),
        ranking("p1", "B > C > A", annotator="ann2", edit="Another fix.", edit_of="B"),
        ranking("p2", "A > B", k=2, prompt=CHAT, edit="7 is prime.", edit_of="A"),
        ranking("p3", "C > B = A"),
        ranking("p4", "A > B", k=2, split="eval", edit="Fixed A.", edit_of="A"),
    ]


EXPECTED = [
    {
        "prompt": "question p1",
        "completion": "Fixed B.",
        "prompt_id": "p1",
        "annotator": "ann1",
        "source": "edit",
        "edit_of": "B",
        "split": None,
    },
    {
        "prompt": "question p1",
        "completion": "Another fix.",
        "prompt_id": "p1",
        "annotator": "ann2",
        "source": "edit",
        "edit_of": "B",
        "split": None,
    },
    {
        "prompt": CHAT,
        "completion": [{"role": "assistant", "content": "7 is prime."}],
        "prompt_id": "p2",
        "annotator": "ann1",
        "source": "edit",
        "edit_of": "A",
        "split": None,
    },
    {
        "prompt": "question p4",
        "completion": "Fixed A.",
        "prompt_id": "p4",
        "annotator": "ann1",
        "source": "edit",
        "edit_of": "A",
        "split": "eval",
    },
]


def test_each_edit_is_one_demonstration_in_rankings_order():
    assert rankings_to_demonstrations(load_rankings(edited_rankings())) == EXPECTED


def test_no_edit_at_all_is_a_clear_error():
    with pytest.raises(DataError, match="none of these 2 rankings has an `edit`") as err:
        build_export(
            load_rankings([ranking("p1", "A > B > C"), ranking("p2", "C > B > A")]), "demonstrations"
        )
    assert err.value.code == "empty"


def test_export_round_trip_is_read_unchanged(tmp_path, in_tmp):
    source = write_jsonl(tmp_path / "rankings.jsonl", edited_rankings())
    argv = ["export", "--rankings", str(source), "--format", "demonstrations", "--out", "demos.jsonl"]
    assert main([*argv, "--tracking.mode", "disabled"]) == 0
    written = read_rows(in_tmp / "demos.jsonl")
    assert written == EXPECTED
    assert load_demonstrations(in_tmp / "demos.jsonl") == written
    # The split travels: `rlhf sft`'s default split=train leaves the eval prompt's edit out.
    assert [d["prompt_id"] for d in load_demonstrations(in_tmp / "demos.jsonl", split="train")] == [
        "p1",
        "p1",
        "p2",
    ]


def test_parquet_keeps_every_column_of_text_prompt_edits(tmp_path):
    """A parquet file holds one type per column: text prompts here (a file mixing text and chat
    prompts is written as JSON Lines, docs/rankings.md)."""
    rankings = [r for r in load_rankings(edited_rankings()) if isinstance(r["prompt"], str)]
    path, _ = write_export(build_export(rankings, "demonstrations"), tmp_path / "demos.parquet")
    assert load_demonstrations(path) == [d for d in EXPECTED if isinstance(d["prompt"], str)]


def test_exported_rankings_keep_edits_whatever_row_comes_first(tmp_path):
    """Parquet takes its columns from the first row: the edit of a later row must not vanish."""
    rankings = load_rankings([ranking("p3", "A > B > C"), *edited_rankings()[:1]])
    path, _ = write_export(build_export(rankings, "rankings"), tmp_path / "rankings.parquet")
    back = load_rankings(path)
    assert [(r["edit"], r["edit_of"]) for r in back] == [(None, None), ("Fixed B.", "B")]


def test_export_help_names_the_format(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "demonstrations" in out and "rlhf sft" in out


# ----------------------------------------------------------------------------- rlhf sft on the edits


def test_sft_trains_on_exported_edits(tmp_path, in_tmp):
    """The exported file through the real command line: `rlhf sft` on the tiny model, two steps."""
    rankings = [
        ranking(f"p{i}", "B > A > C", prompt=CHAT if i % 2 else None, edit=f"Fixed {i}.", edit_of="B")
        for i in range(4)
    ]
    source = write_jsonl(tmp_path / "rankings.jsonl", rankings)
    export = ["export", "--rankings", str(source), "--format", "demonstrations", "--out", "demos.jsonl"]
    assert main([*export, "--tracking.mode", "disabled"]) == 0
    sft = ["sft", "--model", "tiny", "--demonstrations", "demos.jsonl", "--max_steps", "2"]
    sft += ["--batch_size", "2", "--eval_fraction", "0", "--logging_steps", "1"]
    assert main([*sft, "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]) == 0
    summary = json.loads((tmp_path / "runs" / "default" / "sft" / "summary.json").read_text())
    assert summary["train/examples"] == 4
    assert summary["train/loss_final"] == summary["train/loss_final"]  # finite, not NaN
