"""Loaders, validation, atomic writers, derived pairs and `rlhf export` (rlhf/data.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.data import (
    MAX_LISTED,
    DataError,
    RowError,
    export_stats,
    load_candidates,
    load_demonstrations,
    load_pairs,
    load_prompts,
    load_rankings,
    prompt_text,
    rankings_to_pairs,
    read_jsonl,
    save_records,
    write_jsonl,
)
from rlhf.rankings import labels_for


def write_lines(path: Path, lines: list) -> Path:
    """Write raw lines (dicts as JSON, str as text, bytes as is), one per line."""
    chunks = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        chunks.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def cands(k: int, labels: str | None = None) -> list[dict]:
    labels = labels or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:k]
    return [
        {"label": lab, "text": f"answer {lab}", "model": "tiny", "gen": {"temperature": 1.0}}
        for lab in labels
    ]


def ranking_rec(pid: str = "p1", ranking: str = "C > B = D > A", k: int = 4, **extra) -> dict:
    return {
        "prompt_id": pid,
        "prompt": f"question {pid}",
        "candidates": cands(k),
        "ranking": ranking,
        "annotator": "ann",
        "flags": [],
        "created_at": "2026-01-01T00:00:00+00:00",
        **extra,
    }


def bad_rows(err: DataError) -> dict[int, list[RowError]]:
    out: dict[int, list[RowError]] = {}
    for e in err.errors:
        out.setdefault(e.row, []).append(e)
    return out


# ----------------------------------------------------------------------------- prompts


def test_prompts_good_file(tmp_path):
    f = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt_id": "a", "prompt": "Give me a tip.", "split": "train", "metadata": {"topic": "advice"}},
            "",  # blank lines carry no record
            {
                "prompt_id": 7,
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Why is the sky blue?"},
                ],
                "split": "eval",
            },
            {"prompt_id": "c", "messages": [{"role": "user", "content": "Hi"}], "split": "train"},
        ],
    )
    recs = load_prompts(f)
    assert [r["prompt_id"] for r in recs] == ["a", "7", "c"]  # numeric ids become strings
    assert recs[2]["prompt"] == [{"role": "user", "content": "Hi"}]  # `messages` accepted as the prompt
    assert [r["prompt_id"] for r in load_prompts(f, split="train")] == ["a", "c"]
    assert [r["prompt_id"] for r in load_prompts(str(f), split="eval")] == ["7"]
    with pytest.raises(DataError) as err:
        load_prompts(f, split="test")
    assert err.value.code == "split" and "train" in str(err.value) and "eval" in str(err.value)


def test_prompts_without_split_field_serve_every_split(tmp_path):
    f = write_lines(
        tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"}]
    )
    assert len(load_prompts(f, split="train")) == 2


def test_every_bad_prompt_row_is_reported_at_once(tmp_path):
    f = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt_id": "ok1", "prompt": "fine"},  # 1 good
            {"prompt": "no id"},  # 2 missing field
            {"prompt_id": "x2", "prompt": 42},  # 3 wrong type
            {"prompt_id": "x3", "prompt": "   "},  # 4 empty prompt
            {"prompt_id": "ok1", "prompt": "again"},  # 5 duplicate id
            '{"prompt_id": "x5", "prompt": "unterminated}',  # 6 invalid JSON
            '{"prompt_id": "x6", "prompt": "n", "score": NaN}',  # 7 NaN
            '{"prompt_id": "x7", "prompt": "n", "score": -Infinity}',  # 8 Infinity
            '["a list"]',  # 9 not an object
            {"prompt_id": "x9", "prompt": "m", "metadata": "oops"},  # 10 wrong type
            {"prompt_id": "x10", "prompt": []},  # 11 empty chat
            {"prompt_id": 1.5, "prompt": "q"},  # 12 float id
            '{"prompt_id": "x12", "prompt_id": "y", "prompt": "q"}',  # 13 duplicate key
            {"prompt_id": "x13", "prompt": [{"role": "bot", "content": "q"}]},  # 14 bad role
            {"prompt_id": "x14", "prompt": "q", "split": 3},  # 15 wrong type
        ],
    )
    with pytest.raises(DataError) as info:
        load_prompts(f)
    err = info.value
    rows = bad_rows(err)
    assert sorted(rows) == list(range(2, 16))
    assert rows[2][0].field == "prompt_id" and rows[2][0].message == "missing"
    assert rows[3][0].field == "prompt" and "an integer" in rows[3][0].message
    assert rows[4][0].field == "prompt" and "empty" in rows[4][0].message
    assert (
        rows[5][0].field == "prompt_id"
        and "duplicate" in rows[5][0].message
        and "line 1" in rows[5][0].message
    )
    assert "not valid JSON" in rows[6][0].message
    assert "NaN" in rows[7][0].message and "Infinity" in rows[8][0].message
    assert "JSON object" in rows[9][0].message
    assert rows[10][0].field == "metadata"
    assert rows[11][0].field == "prompt"
    assert rows[12][0].field == "prompt_id"
    assert "duplicate key" in rows[13][0].message
    assert rows[14][0].field == "prompt[0].role" and "'bot'" in rows[14][0].message
    assert rows[15][0].field == "split"
    msg = str(err)
    lines = msg.splitlines()
    assert lines[0] == f"14 bad rows in {f} (prompts):"
    assert len(lines) == 15 and all(
        line.startswith(f"  line {n}:") for n, line in zip(range(2, 16), lines[1:])
    )
    assert err.code == "bad_rows"


def test_one_bad_row_is_one_line(tmp_path):
    f = write_lines(
        tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": ""}]
    )
    with pytest.raises(DataError) as err:
        load_prompts(f)
    assert str(err.value) == f"bad row in {f}: line 2: prompt: is empty"


def test_the_list_of_bad_rows_is_capped(tmp_path):
    n = MAX_LISTED + 12
    f = write_lines(tmp_path / "p.jsonl", [{"prompt_id": str(i), "prompt": ""} for i in range(n)])
    with pytest.raises(DataError) as err:
        load_prompts(f)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{n} bad rows")
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1].strip() == "… and 12 more bad rows"
    assert len(err.value.errors) == n  # the exception keeps them all


def test_non_utf8_bytes_name_the_row(tmp_path):
    f = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt_id": "a", "prompt": "x"},
            {"prompt_id": "b", "prompt": "y"},
            b'{"prompt_id": "c", "prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        ],
    )
    with pytest.raises(DataError) as err:
        load_prompts(f)
    (e,) = err.value.errors
    assert e.row == 3 and "UTF-8" in e.message and "0xe9" in e.message


def test_a_bom_is_a_clear_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt_id": "a", "prompt": "x"}).encode() + b"\n")
    with pytest.raises(DataError) as err:
        load_prompts(f)
    (e,) = err.value.errors
    assert e.row == 1 and "byte-order mark" in e.message and "without a BOM" in e.message
    (tmp_path / "u16.jsonl").write_bytes('{"prompt_id": "a"}\n'.encode("utf-16"))
    with pytest.raises(DataError) as err:
        load_prompts(tmp_path / "u16.jsonl")
    assert err.value.code == "encoding" and "UTF-16" in str(err.value)


def test_huge_lines_are_reported_and_counting_goes_on(tmp_path):
    huge = json.dumps({"prompt_id": "big", "prompt": "x" * (1 << 20)})  # just over 1 MB
    f = write_lines(
        tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "x"}, huge, {"prompt_id": "c", "prompt": ""}]
    )
    with pytest.raises(DataError) as err:
        load_prompts(f)
    rows = bad_rows(err.value)
    assert sorted(rows) == [2, 3]
    assert "longer than 1,048,576 bytes" in rows[2][0].message
    assert rows[3][0].field == "prompt"


def test_a_pretty_printed_json_file_under_a_jsonl_name(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps([{"prompt_id": "a", "prompt": "x"}], indent=2))
    with pytest.raises(DataError) as err:
        load_prompts(f)
    assert err.value.code == "bad_json" and "not JSON Lines" in str(err.value)
    assert load_prompts(f.rename(tmp_path / "p.json")) == [{"prompt_id": "a", "prompt": "x"}]


def test_crlf_and_trailing_space_are_fine(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt_id": "a", "prompt": "x"}  \r\n\r\n{"prompt_id": "b", "prompt": "y"}\r\n')
    assert [r["prompt_id"] for r in load_prompts(f)] == ["a", "b"]


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("missing.jsonl", "not_found"),
        ("someone/some-dataset", "offline"),  # a Hub id: tests run with HF_HUB_OFFLINE=1
        ("lab:nothing", "source"),
        ("", "not_found"),
    ],
)
def test_bad_sources(source, code, in_tmp):
    with pytest.raises(DataError) as err:
        load_prompts(source)
    assert err.value.code == code
    assert "\n" not in str(err.value)


def test_unsupported_file_and_plain_folder(tmp_path):
    (tmp_path / "p.csv").write_text("prompt_id,prompt\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_prompts(tmp_path / "p.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a saved dataset"):
        load_prompts(tmp_path / "folder")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError) as err:
        load_prompts(tmp_path / "empty.jsonl")
    assert err.value.code == "empty"


def test_json_array_and_in_memory_records(tmp_path):
    recs = [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"}]
    (tmp_path / "p.json").write_text(json.dumps(recs, indent=2))
    assert load_prompts(tmp_path / "p.json") == recs
    assert load_prompts(recs) == recs
    with pytest.raises(DataError) as err:
        load_prompts([recs[0], {"prompt_id": "a", "prompt": "z"}])
    assert "record 2: prompt_id: duplicate id 'a' (first on record 1)" in str(err.value)


def test_shipped_lab_data():
    from importlib import resources

    if not resources.files("rlhf.lab_data").joinpath("prompts.jsonl").is_file():
        pytest.skip("rlhf/lab_data/prompts.jsonl not written yet")
    prompts = load_prompts("lab:prompts")
    assert len(prompts) >= 300
    assert {p["split"] for p in prompts} >= {"train", "eval"}
    assert len(load_prompts("lab:prompts", split="eval")) < len(prompts)
    demos = load_demonstrations("lab:demonstrations")
    assert len(demos) >= 150


# ----------------------------------------------------------------------------- demonstrations


def test_demonstrations_accept_trl_formats(tmp_path):
    good = [
        {"prompt": "Name a fruit.", "completion": "An apple."},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello!"}],
        },
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            "split": "train",
        },
    ]
    f = write_lines(tmp_path / "d.jsonl", good)
    assert load_demonstrations(f) == good


def test_bad_demonstrations(tmp_path):
    f = write_lines(
        tmp_path / "d.jsonl",
        [
            {"prompt": "q", "completion": "a"},  # 1 ok
            {"prompt": "q"},  # 2 missing
            {"prompt": "q", "completion": "  "},  # 3 empty
            {"messages": [{"role": "user", "content": "q"}]},  # 4 no answer
            {"prompt": [{"role": "user", "content": "q"}], "completion": "a"},  # 5 mixed
            {"text": "just text"},  # 6 no format
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "prompt": "q",
                "completion": "a",
            },  # 7 both
            {"prompt": "q", "completion": [{"role": "user", "content": "a"}]},  # 8 wrong role
            {"prompt": "q", "completion": 5},  # 9 wrong type
        ],
    )
    with pytest.raises(DataError) as err:
        load_demonstrations(f)
    rows = bad_rows(err.value)
    assert sorted(rows) == list(range(2, 10))
    assert rows[2][0].field == "completion" and rows[2][0].message == "missing"
    assert rows[3][0].field == "completion" and "empty" in rows[3][0].message
    assert "end with the assistant" in rows[4][0].message
    assert "same format" in rows[5][0].message
    assert "prompt` + `completion` or chat `messages`" in rows[6][0].message
    assert "not both" in rows[7][0].message
    assert "assistant" in rows[8][0].message


# ----------------------------------------------------------------------------- candidates


def test_candidates_good_and_bad(tmp_path):
    good = {"prompt_id": "p1", "prompt": "q", "candidates": cands(3)}
    f = write_lines(
        tmp_path / "c.jsonl",
        [
            good,
            {"prompt_id": "p2", "prompt": "q", "candidates": cands(1)},  # 2 K < 2
            {"prompt_id": "p3", "prompt": "q", "candidates": cands(27, "A" * 27)},  # 3 K > 26
            {"prompt_id": "p4", "prompt": "q", "candidates": cands(3, "ACB")},  # 4 labels out of order
            {
                "prompt_id": "p5",
                "prompt": "q",
                "candidates": [{"label": "A", "text": "x"}, {"label": "B"}],
            },  # 5
            {
                "prompt_id": "p6",
                "prompt": "q",
                "candidates": [{"label": "A", "text": 1}, {"label": "B", "text": ""}],
            },
            {"prompt_id": "p1", "prompt": "q", "candidates": cands(2)},  # 7 duplicate id
            {"prompt_id": "p8", "prompt": "q", "candidates": "A, B"},  # 8 wrong type
            {"prompt_id": "p9", "prompt": "q"},  # 9 missing
        ],
    )
    with pytest.raises(DataError) as err:
        load_candidates(f)
    rows = bad_rows(err.value)
    assert sorted(rows) == list(range(2, 10))
    assert "K = 1" in rows[2][0].message and "2 to 26" in rows[2][0].message
    assert "K = 27" in rows[3][0].message
    assert rows[4][0].field == "candidates[1].label" and "'C', expected 'B'" in rows[4][0].message
    assert rows[5][0].field == "candidates[1].text" and rows[5][0].message == "missing"
    assert rows[6][0].field == "candidates[0].text"  # an empty text (row 6, B) is a valid generation
    assert "duplicate id 'p1' (first on line 1)" in rows[7][0].message
    assert rows[8][0].field == "candidates" and rows[9][0].message == "missing"
    assert load_candidates([good]) == [good]


# ----------------------------------------------------------------------------- rankings


def test_rankings_are_canonicalised(tmp_path):
    f = write_lines(
        tmp_path / "r.jsonl",
        [
            ranking_rec("p1", "c>d=b>a", gold={"A": 0.1, "B": 0.5, "C": 0.9, "D": 0.5}),
            {k: v for k, v in ranking_rec("p2").items() if k not in ("ranking", "annotator", "flags")}
            | {"tiers": [["a", "B", "c", "D"]]},
            ranking_rec("p3", "B > A", k=2),
        ],
    )
    r1, r2, r3 = load_rankings(f)
    assert r1["ranking"] == "C > B = D > A" and r1["tiers"] == [["C"], ["B", "D"], ["A"]]
    assert r1["gold"]["C"] == 0.9  # extra fields are kept
    assert r2["ranking"] == "A = B = C = D" and r2["flags"] == ["all_tied"] and r2["annotator"] == "unknown"
    assert r3["tiers"] == [["B"], ["A"]]


@pytest.mark.parametrize(
    ("ranking", "code"),
    [
        ("", "empty"),
        ("C >> B = D > A", "syntax"),
        ("A < B < C < D", "syntax"),
        ("C > B = E > A", "unknown_label"),
        ("C > B = D > C", "duplicate_label"),
        ("C > B = D", "missing_label"),
        (["C", "B"], None),
    ],
)
def test_a_ranking_that_does_not_parse_reports_its_code(tmp_path, ranking, code):
    f = write_lines(tmp_path / "r.jsonl", [ranking_rec("p0"), ranking_rec("p1", ranking)])
    with pytest.raises(DataError) as err:
        load_rankings(f)
    (e,) = err.value.errors
    assert (e.row, e.field) == (2, "ranking")
    if code:
        assert e.message.startswith(f"[{code}]")
    assert str(err.value).startswith(f"bad row in {f}: line 2: ranking: ")


def test_tiers_must_agree_with_the_ranking(tmp_path):
    f = write_lines(
        tmp_path / "r.jsonl",
        [
            ranking_rec("p1", tiers=[["C"], ["B", "D"], ["A"]]),  # consistent
            ranking_rec("p2", tiers=[["C"], ["B"], ["D"], ["A"]]),
            ranking_rec("p3", tiers=[["C"], ["B", "D"]]),
            {k: v for k, v in ranking_rec("p4").items() if k != "ranking"},
            ranking_rec("p5", annotator=["x"]),
        ],
    )
    with pytest.raises(DataError) as err:
        load_rankings(f)
    rows = bad_rows(err.value)
    assert sorted(rows) == [2, 3, 4, 5]
    assert (
        rows[2][0].field == "tiers"
        and "'C > B > D > A'" in rows[2][0].message
        and "'C > B = D > A'" in rows[2][0].message
    )
    assert rows[3][0].field == "tiers" and rows[3][0].message.startswith("[missing_label]")
    assert rows[4][0].field == "ranking" and "missing" in rows[4][0].message
    assert rows[5][0].field == "annotator"


# ----------------------------------------------------------------------------- pairs


def test_pairs_of_c_b_d_a_by_hand():
    pairs = rankings_to_pairs([ranking_rec("p1", "C > B = D > A")])
    got = [(p["chosen_label"], p["rejected_label"], p["tie"]) for p in pairs]
    # docs/rankings.md: strict (C,B) (C,D) (C,A) (B,A) (D,A) and the tie {B,D}: C(4,2) = 6 rows.
    assert got == [
        ("C", "B", False),
        ("C", "D", False),
        ("C", "A", False),
        ("B", "A", False),
        ("D", "A", False),
        ("B", "D", True),
    ]
    assert pairs[0] == {
        "prompt_id": "p1",
        "prompt": "question p1",
        "chosen": "answer C",
        "rejected": "answer B",
        "tie": False,
        "annotator": "ann",
        "chosen_label": "C",
        "rejected_label": "B",
    }
    assert all(p["chosen"] == f"answer {p['chosen_label']}" for p in pairs)


def test_pairs_count_and_chat_prompts():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    recs = [
        ranking_rec("p1", "A = B = C = D"),
        ranking_rec("p2", "E > D > C > B > A", k=5) | {"prompt": chat},
    ]
    pairs = rankings_to_pairs(recs)
    assert len(pairs) == math.comb(4, 2) + math.comb(5, 2)
    assert sum(p["tie"] for p in pairs) == 6
    assert pairs[-1]["prompt"] == "system: Be brief.\nuser: Hi?"


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 8).flatmap(
        lambda k: st.tuples(
            st.permutations(labels_for(k)),
            st.lists(st.sampled_from(" > = ".split()), min_size=k - 1, max_size=k - 1),
        )
    )
)
def test_pairs_follow_the_ranking(spec):
    perm, ops = spec
    text = perm[0] + "".join(f" {op} {lab}" for op, lab in zip(ops, perm[1:]))
    (rec,) = load_rankings([ranking_rec("p", text, k=len(perm))])
    pairs = rankings_to_pairs([rec])
    assert len(pairs) == math.comb(len(perm), 2)
    tier = {lab: i for i, t in enumerate(rec["tiers"]) for lab in t}
    for p in pairs:
        a, b = p["chosen_label"], p["rejected_label"]
        assert p["tie"] == (tier[a] == tier[b])
        assert p["tie"] or tier[a] < tier[b]
        assert (p["chosen"], p["rejected"]) == (f"answer {a}", f"answer {b}")
    assert export_stats([rec], pairs)["export/all_tied_rankings"] == int(set(ops) == {"="})


def test_load_pairs(tmp_path):
    pairs = rankings_to_pairs([ranking_rec()])
    f = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert load_pairs(f) == pairs
    trl_style = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    (loaded,) = load_pairs(trl_style)
    assert (
        loaded["tie"] is False and loaded["prompt_id"].startswith("p-") and loaded["annotator"] == "unknown"
    )
    with pytest.raises(DataError) as err:
        load_pairs(
            [{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b", "tie": "yes"}]
        )
    rows = bad_rows(err.value)
    assert rows[1][0].field == "rejected" and rows[2][0].field == "tie"


def test_prompt_text():
    assert prompt_text("hello") == "hello"
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    assert prompt_text([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    with pytest.raises(ValueError):
        prompt_text(3)


# ----------------------------------------------------------------------------- writers and round trips


def test_write_read_round_trip(tmp_path):
    recs = [
        {"id": 1, "text": "héllo ✓ 你好", "nested": {"a": [1, 2.5, None, True]}},
        {"id": 2, "text": "line\nbreak"},
    ]
    path = write_jsonl(tmp_path / "sub" / "x.jsonl", recs)
    assert read_jsonl(path) == recs
    assert "你好" in path.read_text(encoding="utf-8")  # UTF-8 text, not \\u escapes


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"old": true}\n')

    def records():
        yield {"a": 1}
        raise RuntimeError("generation crashed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert path.read_text() == '{"old": true}\n'  # the old file is untouched
    with pytest.raises(DataError) as err:
        write_jsonl(tmp_path / "nan.jsonl", [{"a": 1}, {"gold": {"A": 0.5, "B": float("nan")}}])
    assert "record 2: gold.B = nan" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]  # no partial or temp files


@pytest.mark.parametrize("name", ["x.jsonl", "x.parquet", "x_dataset"])
def test_unwritable_output_is_a_data_error(tmp_path, name):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError) as err:
        save_records([{"a": 1}], tmp_path / "file" / name)
    assert err.value.code == "output" and "cannot write" in str(err.value)


def test_a_dataset_folder_is_saved_over_a_dataset_never_over_other_files(tmp_path):
    """A dataset folder is saved by swapping the whole folder in: over an earlier dataset, yes;
    over a folder of the user's, one clear line before anything is written, the folder untouched."""
    recs = load_rankings([ranking_rec("p1")])
    out = save_records(recs, tmp_path / "ds")
    assert load_rankings(save_records(recs * 2, out)) == recs * 2  # a dataset replaced by a dataset
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError) as err:
        save_records(recs, mine)
    assert err.value.code == "output" and "no state.json or dataset_dict.json" in str(err.value)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet", "out_dataset"])
def test_save_records_round_trip(tmp_path, name):
    recs = load_rankings([ranking_rec("p1"), ranking_rec("p2", "A > B > C > D")])
    out = save_records(recs, tmp_path / name)
    assert load_rankings(out) == recs
    pairs = rankings_to_pairs(recs)
    out2 = save_records(pairs, tmp_path / ("pairs_" + name))
    assert load_pairs(out2) == pairs


def test_saved_pairs_have_the_columns_trl_reads(tmp_path):
    import datasets

    pairs = rankings_to_pairs([ranking_rec()])
    out = save_records(pairs, tmp_path / "pairs")
    ds = datasets.load_from_disk(str(out))
    assert {c: ds.features[c].dtype for c in ("prompt", "chosen", "rejected", "tie")} == {
        "prompt": "string",
        "chosen": "string",
        "rejected": "string",
        "tie": "bool",
    }
    assert ds.num_rows == 6
    # Saving again replaces the folder in one step.
    save_records(pairs[:2], out)
    assert datasets.load_from_disk(str(out)).num_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


def test_save_records_failures_leave_nothing(tmp_path):
    with pytest.raises(DataError, match="write .jsonl instead"):
        save_records([{"a": "text"}, {"a": [1, 2]}], tmp_path / "mixed")
    with pytest.raises(DataError, match="use a .jsonl or .parquet file"):
        save_records([{"a": 1}], tmp_path / "x.csv")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- rlhf export


@pytest.fixture()
def rankings_file(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "rankings.jsonl",
        [
            ranking_rec("p1", "C > B = D > A"),
            ranking_rec("p2", "A = B = C = D"),
            ranking_rec("p3", "B > A", k=2),
        ],
    )


def test_export_pairs_through_the_cli(rankings_file, in_tmp, capsys):
    from rlhf.cli import main

    assert main(["export", "--rankings", str(rankings_file), "--tracking.mode", "disabled"]) == 0
    out = in_tmp / "runs" / "default" / "export" / "pairs.jsonl"
    pairs = load_pairs(out)
    assert len(pairs) == 6 + 6 + 1
    printed = capsys.readouterr().out
    assert "3 rankings" in printed and "6 strict pairs" in printed and "7 tie pairs" in printed
    assert "1 all-tied rankings" in printed
    assert (in_tmp / "runs" / "default" / "export" / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["export/strict_pairs"] == 6 and metrics[0]["export/tie_pairs"] == 7

    assert (
        main(
            [
                "export",
                "--rankings",
                str(rankings_file),
                "--drop-ties",
                "--out",
                "no_ties",
                "--tracking.mode",
                "disabled",
            ]
        )
        == 0
    )
    import datasets

    ds = datasets.load_from_disk("no_ties")
    assert ds.num_rows == 6 and not any(ds["tie"])


def test_export_rankings_logs_a_wandb_artifact(rankings_file, in_tmp):
    from rlhf.config import build_config
    from rlhf.data import ExportConfig, run_export

    cfg = build_config(
        ExportConfig,
        None,
        {
            "rankings": str(rankings_file),
            "format": "rankings",
            "drop_ties": True,
            "out": "ranked.jsonl",
            "experiment": "exp1",
            "tracking.mode": "offline",
        },
    )
    summary = run_export(cfg)
    assert summary["export/written"] == 2 and summary["out"] == "ranked.jsonl"
    assert [r["prompt_id"] for r in load_rankings("ranked.jsonl")] == ["p1", "p3"]
    run_dir = Path(summary["run_dir"])
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert json.loads((run_dir / "summary.json").read_text())["export/rankings"] == 3


def test_export_bad_file_exits_2_with_one_clear_line_and_no_output(tmp_path, in_tmp, capsys):
    from rlhf.cli import main

    bad = write_lines(tmp_path / "bad.jsonl", [ranking_rec("p1"), ranking_rec("p2", "C > B >> A")])
    rc = main(["export", "--rankings", str(bad), "--out", "pairs.jsonl", "--tracking.mode", "disabled"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"rlhf: error[bad_rows]: bad row in {bad}: line 2: ranking: [syntax]")
    assert not (in_tmp / "pairs.jsonl").exists() and not (in_tmp / "runs").exists()

    assert main(["export", "--tracking.mode", "disabled"]) == 2
    assert "--rankings is required" in capsys.readouterr().err
    assert main(["export", "--rankings", str(bad), "--out", "x.csv"]) == 2
    assert ".jsonl or .parquet" in capsys.readouterr().err
    assert main(["export", "--rankings", "nope.jsonl"]) == 2
    assert "file not found: nope.jsonl" in capsys.readouterr().err
    assert [p.name for p in in_tmp.iterdir()] == ["bad.jsonl"]  # in_tmp is tmp_path: nothing else written


def test_export_help_lists_every_option(capsys):
    from rlhf.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for opt in (
        "--rankings",
        "--format",
        "--out",
        "--drop-ties",
        "--drop_ties",
        "--experiment",
        "--runs_dir",
        "--seed",
        "--tracking.mode",
    ):
        assert opt in text


def test_a_saved_dataset_dict_gives_its_split_names(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"}]
            ),
            "eval": datasets.Dataset.from_list(
                [{"prompt_id": "c", "prompt": "z"}, {"prompt_id": "d", "prompt": ""}]
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as err:
        load_prompts(tmp_path / "dd")
    assert str(err.value) == f"bad row in {tmp_path / 'dd'}: eval row 2: prompt: is empty"
    dd["eval"] = dd["eval"].select([0])
    dd.save_to_disk(str(tmp_path / "dd2"))
    assert [p["prompt_id"] for p in load_prompts(tmp_path / "dd2", split="eval")] == ["c"]
    assert [p["split"] for p in load_prompts(tmp_path / "dd2")] == ["train", "train", "eval"]


@pytest.mark.slow
def test_exported_pairs_train_trls_reward_trainer_unchanged(tmp_path):
    """The contract's promise: `rlhf export` pairs load in TRL's RewardTrainer as they are."""
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf.models import load_tokenizer, resolve_model_path

    pairs = rankings_to_pairs([ranking_rec(f"p{i}", "C > B = D > A") for i in range(4)])
    out = save_records([p for p in pairs if not p["tie"]], tmp_path / "pairs")
    tok = load_tokenizer("tiny", padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("tiny"), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp_path / "rt"),
        per_device_train_batch_size=4,
        max_steps=2,
        bf16=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=datasets.load_from_disk(str(out)), processing_class=tok
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)


@pytest.mark.parametrize("suffix", [".parquet", ""])
def test_a_field_only_later_records_carry_survives_parquet_and_datasets(tmp_path, suffix):
    from rlhf.datafiles import read_source, save_records

    records = [{"id": "a", "x": 1}, {"id": "b", "x": 2, "note": "only here"}]
    out = save_records(records, tmp_path / f"recs{suffix}")
    assert [rec for _, _, rec in read_source(out).rows] == [
        {"id": "a", "x": 1, "note": None},
        {"id": "b", "x": 2, "note": "only here"},
    ]


@pytest.mark.parametrize("suffix", [".parquet", ""])
def test_empty_objects_are_stored_as_missing_in_parquet_and_datasets(tmp_path, suffix):
    """Parquet cannot hold a struct with no fields: candidates' ``gen: {}`` in every row used to
    stop the export with pyarrow's error."""
    from rlhf.datafiles import read_source, save_records

    records = [
        {"id": "a", "candidates": [{"label": "A", "gen": {}}, {"label": "B", "gen": {}}], "meta": {}},
        {"id": "b", "candidates": [{"label": "A", "gen": {}}, {"label": "B", "gen": {}}], "meta": {}},
    ]
    out = save_records(records, tmp_path / f"recs{suffix}")
    rows = [rec for _, _, rec in read_source(out).rows]
    assert [rec["id"] for rec in rows] == ["a", "b"]
    assert all(c["gen"] in (None, {}) for rec in rows for c in rec["candidates"])
    assert [c["label"] for c in rows[1]["candidates"]] == ["A", "B"]
