"""`rlhf annotate` through the real command line: users, import (idempotent, bad rows), export, stats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from annotation_app.io import export_rankings, import_candidates, load_project_config
from annotation_app.store import Store
from rlhf.cli import main
from rlhf.data import load_pairs, load_rankings

REPO = Path(__file__).resolve().parents[2]


def candidates(n: int = 3, k: int = 3) -> list[dict]:
    return [
        {
            "prompt_id": f"p{i}",
            "prompt": f"Say something nice #{i}",
            "candidates": [
                {"label": lab, "text": f"answer {lab}{i}", "model": "tiny", "gen": {"temperature": 1.0}}
                for lab in "ABCDEFGHIJ"[:k]
            ],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records, *, bom: bool = False, crlf: bool = False) -> Path:
    sep = "\r\n" if crlf else "\n"
    text = sep.join(r if isinstance(r, str) else json.dumps(r) for r in records) + sep
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_cli_round_trip(tmp_path, capsys, monkeypatch):
    import io as _io

    db = str(tmp_path / "lab.db")
    src = write_jsonl(tmp_path / "cands.jsonl", candidates(), crlf=True)
    monkeypatch.setattr(sys, "stdin", _io.StringIO("s3cret-password\n"))
    assert main(["annotate", "users", "add", "ada", "--role", "admin", "--db", db]) == 0
    cfg = REPO / "experiments" / "configs" / "annotation_project.yaml"
    assert main(["annotate", "import", str(src), "--db", db, "--project-config", str(cfg)]) == 0
    assert main(["annotate", "import", str(src), "--db", db, "--project-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "3 new prompts" in out and "0 new prompts, 3 already imported" in out

    store = Store(db)
    project = load_project_config(cfg)
    assert store.project(project["project"])["quorum"] == project["quorum"]
    assert store.verify_password("ada", "s3cret-password")
    item = store.next_item("ada")
    store.submit("ada", item.prompt_id, "C > A = B")

    assert (
        main(["annotate", "export", "--db", db, "--format", "rankings", "--out", str(tmp_path / "r.jsonl")])
        == 0
    )
    assert (
        main(["annotate", "export", "--db", db, "--format", "pairs", "--out", str(tmp_path / "pairs")]) == 0
    )
    [rec] = load_rankings(str(tmp_path / "r.jsonl"))
    assert (rec["ranking"], rec["annotator"], rec["prompt_id"]) == ("C > A = B", "ada", item.prompt_id)
    assert rec["candidates"][0]["gen"] == {"temperature": 1.0}
    pairs = load_pairs(str(tmp_path / "pairs"))
    assert len(pairs) == 3 and sum(p["tie"] for p in pairs) == 1  # C>A, C>B strict, A=B tie kept

    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "pairs"))
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)  # TRL RewardTrainer's columns

    capsys.readouterr()
    assert main(["annotate", "stats", "--db", db, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["submitted"] == 1 and stats["agreement"]["tie_rate"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"prompt_id": "a", "prompt": "x", "candidates": [{"label": "A", "text": "only one"}]}], "K = 1"),
        (
            [{"prompt_id": "a", "candidates": [{"label": "A", "text": "1"}, {"label": "B", "text": "2"}]}],
            "prompt",
        ),
        ([candidates(1)[0], candidates(1)[0]], "line 2"),  # duplicate id
        (['{"prompt_id": "a", "prompt": NaN, "candidates": []}'], "line 1"),
        (["{not json"], "line 1"),
    ],
)
def test_bad_import_files_are_refused_whole(tmp_path, capsys, rows, needle):
    db = tmp_path / "lab.db"
    src = write_jsonl(tmp_path / "bad.jsonl", [*candidates(2, k=2)[:0], *rows])
    rc = main(["annotate", "import", str(src), "--db", str(db)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rlhf: error[") and needle in err and "Traceback" not in err
    assert Store(db).counts()["prompts"] == 0


def test_bom_is_reported(tmp_path, capsys):
    src = write_jsonl(tmp_path / "bom.jsonl", candidates(), bom=True)
    assert main(["annotate", "import", str(src), "--db", str(tmp_path / "lab.db")]) == 2
    assert "BOM" in capsys.readouterr().err


def test_oversized_response_is_refused(tmp_path):
    recs = candidates(2)
    recs[1]["candidates"][2]["text"] = "x" * 100_000
    src = write_jsonl(tmp_path / "big.jsonl", recs)
    store = Store(tmp_path / "lab.db")
    with pytest.raises(Exception) as e:
        import_candidates(store, str(src))
    assert "row 2: candidate C is 100000 characters" in str(e.value)
    assert store.counts()["prompts"] == 0


def test_hostile_text_is_stored_verbatim(tmp_path):
    hostile = [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "![x](http://evil/x.png)",
        "abc\u202edcba",
        "zero\u200bwidth",
    ]
    recs = [
        {
            "prompt_id": "h",
            "prompt": "p",
            "candidates": [{"label": "ABCDE"[i], "text": t} for i, t in enumerate(hostile)],
        }
    ]
    store = Store(tmp_path / "lab.db")
    import_candidates(store, str(write_jsonl(tmp_path / "h.jsonl", recs)))
    assert [c["text"] for c in store._candidates("h")] == hostile


def test_export_nothing_and_users_errors(tmp_path, capsys, monkeypatch):
    import io as _io

    db = str(tmp_path / "lab.db")
    assert main(["annotate", "stats", "--db", db]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", _io.StringIO("short\n"))
    assert main(["annotate", "users", "add", "bob", "--db", db]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    with pytest.raises(Exception) as e:
        export_rankings(Store(db), str(tmp_path / "x.jsonl"))
    assert e.value.code == "nothing_to_export"
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_subprocess_help():
    res = subprocess.run(
        [str(REPO / ".venv" / "bin" / "rlhf"), "annotate", "import", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "--project_config" in res.stdout and "adds nothing" in res.stdout


def test_serve_refuses_a_database_without_users(tmp_path, capsys):
    Store(tmp_path / "empty.db").close()
    assert main(["annotate", "serve", "--db", str(tmp_path / "empty.db"), "--port", "0"]) == 2
    assert "no users yet" in capsys.readouterr().err


def test_serve_candidates_for_quickstart(tmp_path, capsys):
    from annotation_app.server import serve_candidates

    src = write_jsonl(tmp_path / "c.jsonl", candidates(2))
    db = tmp_path / "qs.db"
    demo, url = serve_candidates(str(src), db=str(db), port=_free_port(), block=False)
    try:
        out = capsys.readouterr().out
        assert "2 new prompts" in out and "created user 'admin' with password" in out
        password = out.split("with password ")[1].split()[0]
        assert Store(db).verify_password("admin", password) and url.startswith("http://127.0.0.1:")
    finally:
        demo.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_propose_stores_a_scorers_ranking_that_only_admins_see(tmp_path, capsys):
    from annotation_app import handlers
    from annotation_app.handlers import Page

    db = str(tmp_path / "lab.db")
    recs = [
        {
            "prompt_id": f"p{i}",
            "prompt": f"Describe a day #{i}",
            "candidates": [
                {"label": "A", "text": "a wonderful, lovely, great day"},
                {"label": "B", "text": "an awful, terrible day"},
                {"label": "C", "text": "a day"},
            ],
        }
        for i in range(3)
    ]
    src = write_jsonl(tmp_path / "cands.jsonl", recs)
    assert main(["annotate", "import", str(src), "--db", db]) == 0
    assert main(["annotate", "propose", "--db", db, "--reward", "vader"]) == 0
    assert "stored 3 proposed rankings from vader" in capsys.readouterr().out
    store = Store(db)
    assert {p["ranking"] for p in store.proposals().values()} == {"A > C > B"}
    # a human who agrees on p0 and one who reverses p1: per-prompt agreement 1 and 0
    store.add_user("ann", "password-ann")
    store.add_user("boss", "password-boss", "admin")
    store.upsert_project("default", quorum=1)
    for order in ("A > C > B", "B > C > A"):
        item = store.next_item("ann")
        store.submit("ann", item.prompt_id, order, [], "", None)
    stats = handlers.admin_statistics(Page.for_store(store), "boss")
    rows = {row[0]: row for row in stats["admin-proposals"].rows}
    assert rows["p0"][3] == 1.0 and rows["p1"][3] == 0.0 and rows["p2"][2] == 0
    assert any(row[0].startswith("model pre-ranking") for row in stats["admin-headline"].rows)
    assert main(["annotate", "propose", "--db", db, "--reward", "no-such-scorer"]) == 2
    store.close()


def test_export_writes_the_annotators_reliability_beside_it(tmp_path):
    store = Store(tmp_path / "lab.db")
    store.upsert_project("default", quorum=3)
    store.add_items(candidates(n=6, k=3))
    for name in ("ann", "ben", "rev"):
        store.add_user(name, f"password-{name}")
    for name in ("ann", "ben", "rev"):
        for _ in range(6):
            item = store.next_item(name)
            store.submit(name, item.prompt_id, "C > B > A" if name == "rev" else "A > B > C", [], "", None)
    out = tmp_path / "rankings.jsonl"
    res = export_rankings(store, str(out))
    sidecar = json.loads((tmp_path / "rankings.annotators.json").read_text())
    assert res["annotators_out"] == str(tmp_path / "rankings.annotators.json")
    weights = {a["annotator"]: a["weight"] for a in sidecar["annotators"]}
    assert weights["rev"] == 0.0 and weights["ann"] > 0.5 and weights["ben"] > 0.5
    # one annotator alone says nothing about reliability: no sidecar
    solo = Store(tmp_path / "solo.db")
    solo.upsert_project("default", quorum=1)
    solo.add_items(candidates(n=2, k=3))
    solo.add_user("ann", "password-ann")
    item = solo.next_item("ann")
    solo.submit("ann", item.prompt_id, "A > B > C", [], "", None)
    assert "annotators_out" not in export_rankings(solo, str(tmp_path / "solo.jsonl"))
    assert not (tmp_path / "solo.annotators.json").exists()


def test_prioritize_serves_the_least_certain_prompts_first(tmp_path, capsys):
    # length:target=4 (words) scores -|n - 4| / 4: the closest pair of scores decides each prompt's place
    gaps = {
        "p0": ("a b c d", "a"),
        "p1": ("a b c", "a b c d e"),
        "p2": ("a b c d", "a b"),
        "p3": ("a b c d", "a b c"),
    }
    recs = [
        {
            "prompt_id": pid,
            "prompt": "Say it",
            "candidates": [{"label": "A", "text": a}, {"label": "B", "text": b}],
        }
        for pid, (a, b) in gaps.items()
    ]
    db = str(tmp_path / "lab.db")
    assert main(["annotate", "import", str(write_jsonl(tmp_path / "c.jsonl", recs)), "--db", db]) == 0
    store = Store(db)
    store.add_user("ann", "password-ann")
    assert store.next_item("ann").prompt_id == "p0"  # import order before any prioritising
    store.release("ann", "p0")
    assert main(["annotate", "prioritize", "--db", db, "--reward", "length:target=4"]) == 0
    assert "4 prompts now served least certain first" in capsys.readouterr().out
    served = []
    for _ in gaps:
        item = store.next_item("ann")
        served.append(item.prompt_id)
        store.submit("ann", item.prompt_id, "A > B")
    # gaps 0 (p1: 3 and 5 words), 0.25 (p3), 0.5 (p2), 0.75 (p0)
    assert served == ["p1", "p3", "p2", "p0"]
    assert (
        main(["annotate", "prioritize", "--db", db, "--reward", "length:target=4", "--by", "ensemble"]) == 2
    )
    assert "needs an ensemble" in capsys.readouterr().err
