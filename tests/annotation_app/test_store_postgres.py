"""The store on PostgreSQL end to end: `rlhf annotate --db postgresql://...`, and two app
processes on one database under load, one of them killed with SIGKILL (the crash and load
benchmarks, small). The store's own tests run on both databases in test_store.py."""

from __future__ import annotations

import io
import json
import sys

import pytest

from annotation_app.store import Store
from experiments.benchmarks import bench_annotation_crash, bench_annotation_load
from rlhf.cli import main
from rlhf.data import load_rankings, write_jsonl


def test_every_annotate_command_takes_a_postgres_url(postgres_db, tmp_path, capsys, monkeypatch):
    src = write_jsonl(
        tmp_path / "cands.jsonl",
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "candidates": [{"label": lab, "text": f"{lab}{i}"} for lab in "AB"],
            }
            for i in range(2)
        ],
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-password\n"))
    assert main(["annotate", "users", "add", "ada", "--role", "admin", "--db", postgres_db]) == 0
    assert main(["annotate", "import", str(src), "--db", postgres_db, "--quorum", "1"]) == 0
    assert main(["annotate", "users", "list", "--db", postgres_db]) == 0
    store = Store(postgres_db)
    item = store.next_item("ada")
    store.submit("ada", item.prompt_id, "B > A", edit=f"a better B{item.prompt_id[1:]}")
    store.close()
    assert main(["annotate", "stats", "--db", postgres_db, "--json"]) == 0
    out = tmp_path / "rankings.jsonl"
    assert main(["annotate", "export", "--db", postgres_db, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ada\tadmin" in printed and '"submitted": 1' in printed and "wrote 1 rankings records" in printed
    assert "s3cret" not in printed
    [row] = load_rankings(str(out))
    assert (row["ranking"], row["edit_of"]) == ("B > A", "B")


def test_an_unreachable_server_is_one_line_before_any_work(capsys):
    pytest.importorskip("psycopg")
    for command in (["stats"], ["users", "list"], ["export", "--out", "x.jsonl"], ["serve"]):
        assert main(["annotate", *command, "--db", "postgresql://ann:pw@127.0.0.1:1/lab"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith("rlhf: error[db_unreachable]: cannot connect to PostgreSQL at") and "\n" not in err
        )
        assert ":pw@" not in err


def test_two_servers_one_killed_store_every_acknowledged_submit_once(postgres_db, tmp_path):
    # Two app processes on one database, annotators spread over both; the first is killed with
    # SIGKILL mid-load and restarted while the second keeps writing.
    report = tmp_path / "crash.json"
    args = ["--db", postgres_db, "--servers", "2", "--annotators", "12", "--kills", "1"]
    args += ["--kill-after-acks", "20", "--tail", "3", "--prompts", "200", "--transport", "http"]
    assert bench_annotation_crash.main([*args, "--workdir", str(tmp_path), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    eo = result["exactly_once"]
    assert eo["acknowledged"] > 20 and eo["acked_missing_or_different"] == 0 and eo["stored_not_acked"] == 0
    assert eo["prompts_over_quorum"] == 0 and eo["integrity_check"] == "ok"
    assert all(n > 0 for n in result["acked_per_server"])  # both processes wrote
    assert result["kills"][0]["acked_before_kill"] >= 20  # killed under load


@pytest.mark.slow
def test_load_on_two_servers(postgres_db, tmp_path):
    report = tmp_path / "load.json"
    args = ["--db", postgres_db, "--servers", "2", "--annotators", "50", "--duration", "20"]
    assert bench_annotation_load.main([*args, "--workdir", str(tmp_path), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["exactly_once"]["acknowledged"] > 0 and result["transport_errors"] == 0
