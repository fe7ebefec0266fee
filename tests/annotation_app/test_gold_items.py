"""Gold and attention items: importing known answers, serving them unannounced at the project's
rate, per-annotator accuracy on them, and gold answers as anchors of the reliability model.

Tests that take ``db`` run on a SQLite file and on a PostgreSQL database (conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from annotation_app import dashboard, handlers
from annotation_app.database import is_url
from annotation_app.gold import gold_accuracy, serve_gold
from annotation_app.handlers import Page
from annotation_app.io import annotators_path, export_rankings, import_candidates, load_project_config
from annotation_app.records import Item
from annotation_app.store import Store, StoreError
from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.reliability import fit_reliability


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def items(n: int, *, prefix: str = "p", k: int = 3, gold: str | None = None) -> list[dict]:
    """``n`` candidates records; each carries ``gold`` when one is given."""
    return [
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": f"prompt {prefix}{i}",
            "candidates": [{"label": lab, "text": f"answer {lab} to {prefix}{i}"} for lab in "ABCDEF"[:k]],
            **({"gold": gold} if gold is not None else {}),
        }
        for i in range(n)
    ]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def open_store(db, *, gold_rate: float, quorum: int = 3, users=("ann1", "ann2")) -> Store:
    store = Store(db, clock=Clock())
    store.upsert_project("default", quorum=quorum, gold_rate=gold_rate, lease_seconds=60)
    for name in users:
        store.add_user(name, "password-" + name)
    store.add_user("boss", "password-boss", "admin")
    return store


def rank_until_done(store: Store, user: str, ranking: str = "A > B > C", limit: int = 1000) -> list[str]:
    """Every prompt the user is served, in order, each submitted with ``ranking``."""
    served = []
    while (item := store.next_item(user)) is not None and len(served) < limit:
        served.append(item.prompt_id)
        store.submit(user, item.prompt_id, ranking)
    return served


# ----------------------------------------------------------------------------- import


def test_gold_answers_are_imported_canonical_and_re_import_is_idempotent(db, tmp_path):
    store = open_store(db, gold_rate=0.5)
    records = items(2) + [{**items(1, prefix="g", k=4)[0], "gold": "b>a = c"}]
    records.append({**items(1, prefix="h", k=4)[0], "gold": "D > b"})  # partial: only D over B is known
    src = write_jsonl(tmp_path / "c.jsonl", records)
    assert import_candidates(store, src)["added"] == 4
    assert store.gold_answers() == {"g0": "B > A = C", "h0": "D > B"}
    assert store.gold_answers("elsewhere") == {}
    assert import_candidates(store, src) == {"added": 0, "unchanged": 4, "rows": 4}
    # The answer is part of the content: a changed one is a conflict, as changed responses are.
    records[2]["gold"] = "A > B = C"
    with pytest.raises(StoreError, match="row 3: prompt_id 'g0' is already imported with different content"):
        import_candidates(store, write_jsonl(tmp_path / "changed.jsonl", records))
    assert store.gold_answers()["g0"] == "B > A = C"
    store.close()


@pytest.mark.parametrize(
    "gold, needle",
    [
        ("A > E", "unknown label E"),
        ("A", "names one response"),
        ("A >> B", "syntax error"),
        ({"A": 1.0, "B": 0.0}, "gold must be the known answer as ranking text"),
        ("", "empty"),
    ],
)
def test_a_bad_gold_answer_is_refused_with_its_row_and_nothing_is_imported(tmp_path, capsys, gold, needle):
    db = str(tmp_path / "lab.db")
    records = items(3)
    records[1]["gold"] = gold
    src = write_jsonl(tmp_path / "bad.jsonl", records)
    assert main(["annotate", "import", src, "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: error[") and "row 2: gold" in err and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert Store(db).counts()["prompts"] == 0
    # Store.add_items, the API under the import, refuses it the same way.
    store = Store(db)
    store.upsert_project("default")
    with pytest.raises(StoreError, match="row 2: gold") as refused:
        store.add_items(records)
    assert refused.value.code == "bad_gold" and store.counts()["prompts"] == 0


def test_gold_rate_comes_from_the_config_and_the_flag_overrides_it(tmp_path, capsys):
    db = str(tmp_path / "lab.db")
    cfg = tmp_path / "project.yaml"
    cfg.write_text("project: round1\ngold_rate: 0.25\n", encoding="utf-8")
    assert load_project_config(cfg)["gold_rate"] == 0.25
    src = write_jsonl(tmp_path / "c.jsonl", items(2) + items(1, prefix="g", gold="A > B"))
    assert main(["annotate", "import", src, "--db", db, "--project_config", str(cfg)]) == 0
    assert Store(db).project("round1")["gold_rate"] == 0.25
    assert (
        main(["annotate", "import", src, "--db", db, "--project_config", str(cfg), "--gold_rate", "0.1"]) == 0
    )
    assert Store(db).project("round1")["gold_rate"] == 0.1
    capsys.readouterr()
    assert (
        main(["annotate", "import", src, "--db", db, "--project_config", str(cfg), "--gold_rate", "1.5"]) == 2
    )
    assert "gold_rate must be a number from 0 to 1, got 1.5" in capsys.readouterr().err
    cfg.write_text("gold_rate: lots\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="gold_rate must be a number from 0 to 1, got 'lots'"):
        load_project_config(cfg)


# ----------------------------------------------------------------------------- serving


def test_the_gold_draw_is_deterministic_and_uniform():
    draws = [serve_gold(f"user{u}", n, 0.3) for u in range(50) for n in range(200)]
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.02)
    assert draws == [serve_gold(f"user{u}", n, 0.3) for u in range(50) for n in range(200)]
    assert not any(serve_gold("ann1", n, 0.0) for n in range(200))
    assert all(serve_gold("ann1", n, 1.0) for n in range(200))


def test_gold_rate_zero_never_serves_gold(db):
    store = open_store(db, gold_rate=0.0, quorum=1)
    store.add_items(items(5) + items(3, prefix="g", gold="A > B"))
    assert rank_until_done(store, "ann1") == [f"p{i}" for i in range(5)]  # then nothing: gold stays parked
    assert store.progress("ann1")["prompts_needing_rankings"] == 0  # gold items never "need" rankings
    store.close()


def test_gold_rate_one_serves_gold_first_and_each_gold_item_once_per_annotator(db):
    store = open_store(db, gold_rate=1.0, quorum=1)
    store.add_items(items(2) + items(3, prefix="g", gold="C > A"))
    gold_first = ["g0", "g1", "g2"]
    assert rank_until_done(store, "ann1") == gold_first + ["p0", "p1"]
    # Gold items are outside the quorum (1 here): ann2 gets every one of them too, but the normal
    # items have their quorum already.
    assert rank_until_done(store, "ann2") == gold_first
    stats = {p["prompt_id"]: p for p in store.stats()["prompts"]}
    assert stats["g0"]["submitted"] == 2 and stats["g0"]["gold"] == "C > A" and stats["p0"]["gold"] is None
    assert store.stats()["complete_prompts"] == 2  # the two normal prompts; gold items do not count
    store.close()


def test_a_gold_rate_serves_about_that_share_deterministically(db):
    store = open_store(db, gold_rate=0.3, quorum=1)
    store.add_items(items(60) + items(30, prefix="g", gold="A > B = C"))
    served = rank_until_done(store, "ann1", limit=60)
    n_gold = sum(pid.startswith("g") for pid in served)
    # The draw is a hash of (user, items done), so the count is the same on every run and backend.
    assert n_gold == sum(serve_gold("ann1", done, 0.3) for done in range(60)) == 16
    assert 0.15 * 60 <= n_gold <= 0.45 * 60
    assert len(set(served)) == 60
    store.close()


def test_gold_items_are_served_when_nothing_else_is_left(db):
    store = open_store(db, gold_rate=0.01, quorum=1)
    store.add_items(items(1) + items(2, prefix="g", gold="B > A"))
    assert not serve_gold("ann1", 0, 0.01)  # the first draw says "not gold"
    assert rank_until_done(store, "ann1") == ["p0", "g0", "g1"]
    store.close()


def test_a_draft_on_a_gold_item_comes_back_whatever_the_quorum(db):
    store = open_store(db, gold_rate=1.0, quorum=1)
    store.add_items(items(1) + items(1, prefix="g", gold="B > A"))
    item = store.next_item("ann1")
    assert item.prompt_id == "g0"
    store.save_draft("ann1", "g0", "B >")
    store.clock.t += 3600  # the lease runs out ...
    assert rank_until_done(store, "ann2") == ["g0", "p0"]  # ... and g0 has more than its quorum
    again = store.next_item("ann1")
    assert again.prompt_id == "g0" and again.draft["ranking"] == "B >"
    store.close()


def test_the_page_and_the_api_never_reveal_a_gold_item(db):
    store = open_store(db, gold_rate=1.0)
    store.add_items(items(1, prefix="g", gold="C > A = B"))
    page = Page.for_store(store)
    assert "gold" not in {f.name for f in dataclasses.fields(Item)}
    view = handlers.load(page, "ann1")
    assert view["prompt-id"] == "g0"
    api = handlers.api_next(page, "ann1")
    assert api["prompt_id"] == "g0" and "gold" not in api
    for shown in (view, api):
        text = json.dumps(shown, default=str)
        assert "C > A = B" not in text and "gold" not in text.lower()
    after = handlers.submit(page, "ann1", "g0", view["client-token"], "A > B > C", False, "")
    assert "gold" not in json.dumps(after, default=str).lower()
    assert "gold" not in json.dumps(store.own_ranking("ann1", "g0")) and "C > A = B" not in json.dumps(
        store.history("ann1")
    )
    store.close()


# ----------------------------------------------------------------------------- accuracy


def ranked(prompt: str, annotator: str, order: str, k: int = 3) -> dict:
    return {
        "prompt_id": prompt,
        "annotator": annotator,
        "ranking": order,
        "tiers": [tier.split(" = ") for tier in order.split(" > ")],
        "candidates": [{"label": lab, "text": lab} for lab in "ABCDEF"[:k]],
    }


def test_pair_accuracy_by_hand():
    gold = {"g1": "A > B = C", "g2": "B > D"}
    rankings = [
        # (A,B) right, (A,C) right, (B,C) tied in the gold but ordered here: wrong → 2 of 3
        ranked("g1", "ana", "A > C > B"),
        # the gold decides only (B,D); D above B is wrong → 0 of 1
        ranked("g2", "ana", "D > B > A > C", k=4),
        ranked("g1", "ben", "A > B = C"),  # all 3 right
        ranked("g2", "ben", "A > B > C > D", k=4),  # (B,D) right
        ranked("p9", "ben", "C > B > A"),  # not a gold item: ignored
    ]
    acc = gold_accuracy(rankings, gold, resamples=1000)
    assert set(acc) == {"ana", "ben"}
    ana, ben = acc["ana"], acc["ben"]
    assert (ana.items, ana.pairs, ana.all_right) == (2, 4, 0.0)
    assert ana.pair_accuracy.value == pytest.approx(2 / 4)
    assert (ben.items, ben.pairs, ben.all_right, ben.pair_accuracy.value) == (2, 4, 1.0, 1.0)
    assert (ben.pair_accuracy.low, ben.pair_accuracy.high) == (1.0, 1.0)
    # Resampling ana's two items: {g1, g1} 4/6, {g1, g2} 2/4, {g2, g2} 0/2, each drawn often
    # enough in 1000 resamples that the 2.5 % and 97.5 % quantiles are the extremes.
    assert (ana.pair_accuracy.low, ana.pair_accuracy.high) == (0.0, pytest.approx(2 / 3))


def test_one_gold_item_has_no_interval():
    [(name, acc)] = gold_accuracy([ranked("g1", "ana", "A > C > B")], {"g1": "A > B = C"}).items()
    assert name == "ana" and acc.pair_accuracy.value == pytest.approx(2 / 3)
    assert math.isnan(acc.pair_accuracy.low) and acc.items == 1 and acc.all_right == 0.0


def test_the_dashboard_rows_carry_gold_accuracy_only_when_there_are_gold_items():
    gold = {f"g{i}": "A > B > C" for i in range(10)}
    rankings = [ranked(f"g{i}", "ana", "A > B > C") for i in range(10)]
    rankings += [ranked(f"g{i}", "ben", "A > B > C" if i < 7 else "B > A > C") for i in range(10)]
    stats = {"annotators": [{"username": n, "submitted": 10, "skipped": 0} for n in ("ana", "ben", "cy")]}
    columns = dashboard.per_annotator_columns(gold)
    assert columns == dashboard.PER_ANNOTATOR_COLUMNS + ["gold_items", "gold_pair_accuracy", "gold_all_right"]
    rows = {row[0]: dict(zip(columns, row)) for row in dashboard.per_annotator(stats, rankings, gold=gold)}
    assert rows["ana"]["gold_items"] == 10 and rows["ana"]["gold_pair_accuracy"] == "1.00 [1.00, 1.00]"
    assert rows["ana"]["gold_all_right"] == 1.0
    # ben: 7 items with 3 of 3 pairs right, 3 with 2 of 3 → 27 / 30
    assert rows["ben"]["gold_pair_accuracy"].startswith("0.90 [") and rows["ben"]["gold_all_right"] == 0.7
    assert (rows["cy"]["gold_items"], rows["cy"]["gold_pair_accuracy"], rows["cy"]["gold_all_right"]) == (
        0,
        "",
        None,
    )
    # Without overlap between annotators the fit still learns from the gold items (its anchors).
    assert rows["ana"]["training_weight"] > rows["ben"]["training_weight"] > 0
    assert dashboard.per_annotator_columns({}) == dashboard.PER_ANNOTATOR_COLUMNS
    assert len(dashboard.per_annotator(stats, rankings)[0]) == len(dashboard.PER_ANNOTATOR_COLUMNS)


def test_the_admin_dashboard_shows_gold_accuracy(db):
    store = open_store(db, gold_rate=1.0)
    store.add_items(items(2) + items(4, prefix="g", gold="A > B > C"))
    rank_until_done(store, "ann1", "A > B > C")
    rank_until_done(store, "ann2", "A > C > B")
    page = Page.for_store(store)
    out = handlers.admin_statistics(page, "boss")
    table = out["admin-annotators"]
    assert table.columns[-3:] == ["gold_items", "gold_pair_accuracy", "gold_all_right"]
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.rows}
    assert rows["ann1"]["gold_items"] == 4 and rows["ann1"]["gold_pair_accuracy"] == "1.00 [1.00, 1.00]"
    assert rows["ann2"]["gold_pair_accuracy"].startswith("0.67") and rows["ann2"]["gold_all_right"] == 0.0
    assert rows["boss"]["gold_items"] == 0
    prompts = {row[0]: dict(zip(out["admin-prompts"].columns, row)) for row in out["admin-prompts"].rows}
    assert prompts["g0"]["gold"] == "A > B > C" and prompts["p0"]["gold"] == ""
    headline = dict((row[0], row[1]) for row in out["admin-headline"].rows)
    assert headline["rankings done / needed"].startswith("4 / 6")  # the two normal prompts, quorum 3
    store.close()


# ----------------------------------------------------------------------------- reliability anchors


def test_the_export_fits_reliability_with_gold_anchors(db, tmp_path):
    """Two annotators who always reverse the known answer outvote the one who gives it: from the
    rankings alone the honest one looks unreliable; with the gold answers as anchors the export's
    reliability fit gets it right."""
    store = open_store(db, gold_rate=1.0, users=("honest", "rev1", "rev2"))
    store.add_items(items(12, prefix="g", gold="A > B > C"))
    rank_until_done(store, "honest", "A > B > C")
    rank_until_done(store, "rev1", "C > B > A")
    rank_until_done(store, "rev2", "C > B > A")
    rankings = store.submitted_rankings()
    blind = fit_reliability(rankings).weights()
    assert blind["honest"] < min(blind["rev1"], blind["rev2"])  # the majority wins without anchors

    res = export_rankings(store, str(tmp_path / "r.jsonl"))
    fit = json.loads(annotators_path(res["out"]).read_text())
    weights = {a["annotator"]: a["weight"] for a in fit["annotators"]}
    assert fit["anchored_items"] == 12 * 3
    assert weights["honest"] > 0.8 and weights["rev1"] == weights["rev2"] == 0.0
    store.close()


def test_annotate_stats_reports_gold_accuracy_per_annotator(db, capsys):
    """The command line says what the dashboard says: each annotator's accuracy on the gold items."""
    store = open_store(db, gold_rate=1.0)
    store.add_items(items(2) + items(4, prefix="g", gold="A > B > C"))
    rank_until_done(store, "ann1", "A > B > C")
    rank_until_done(store, "ann2", "A > C > B")
    store.close()

    assert main(["annotate", "stats", "--db", db, "--json"]) == 0
    users = {u["username"]: u for u in json.loads(capsys.readouterr().out)["annotators"]}
    assert users["ann1"]["gold"]["items"] == 4 and users["ann1"]["gold"]["pair_accuracy"] == 1.0
    assert users["ann2"]["gold"]["pair_accuracy"] == pytest.approx(2 / 3)  # B > C reversed, of 3 pairs
    assert users["ann2"]["gold"]["all_right"] == 0.0 and "gold" not in users["boss"]

    assert main(["annotate", "stats", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("annotator\t"))
    assert header.endswith("gold_items\tgold_pair_accuracy")
    rows = {line.split("\t")[0]: line.split("\t") for line in lines if "\t" in line}
    assert rows["ann1"][-2:] == ["4", "1.00 [1.00, 1.00]"] and rows["ann2"][-1].startswith("0.67")
    assert rows["boss"][-2:] == ["0", "-"]


def test_annotate_stats_has_no_gold_columns_without_gold_items(db, capsys):
    store = open_store(db, gold_rate=0.0)
    store.add_items(items(2))
    rank_until_done(store, "ann1")
    store.close()
    assert main(["annotate", "stats", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "gold_items" not in out and "ann1" in out


def test_a_mistyped_gold_answer_is_corrected_by_importing_the_fixed_file(db, tmp_path, capsys):
    """`rlhf annotate import --correct_gold`: only the answer of a stored gold item may change; the
    change is audited and the rankings already made are judged against the new answer."""
    store = open_store(db, gold_rate=1.0)
    records = items(2) + items(2, prefix="g", gold="C > B > A")  # mistyped: should be A > B > C
    src = write_jsonl(tmp_path / "c.jsonl", records)
    assert import_candidates(store, src)["added"] == 4
    rank_until_done(store, "ann1", "A > B > C")
    before = gold_accuracy(store.submitted_rankings(), store.gold_answers())["ann1"]
    assert before.pair_accuracy.value == 0.0
    store.close()

    for rec in records[2:]:
        rec["gold"] = "a > b > c"
    fixed = write_jsonl(tmp_path / "fixed.jsonl", records)
    assert main(["annotate", "import", fixed, "--db", db]) == 2  # without the flag: a conflict
    assert "already imported with different content" in capsys.readouterr().err
    assert main(["annotate", "import", fixed, "--db", db, "--correct_gold"]) == 0
    assert "2 gold answers corrected" in capsys.readouterr().out

    store = Store(db, clock=Clock())
    assert store.gold_answers() == {"g0": "A > B > C", "g1": "A > B > C"}
    after = gold_accuracy(store.submitted_rankings(), store.gold_answers())["ann1"]
    assert after.pair_accuracy.value == 1.0 and after.items == 2
    audit = store.conn.execute(
        "SELECT prompt_id, detail FROM audit_log WHERE action = 'correct_gold' ORDER BY prompt_id"
    ).fetchall()
    assert [row["prompt_id"] for row in audit] == ["g0", "g1"]
    assert json.loads(audit[0]["detail"]) == {"before": "C > B > A", "after": "A > B > C"}
    # the corrected file is now the stored content: importing it again changes nothing
    assert import_candidates(store, fixed, correct_gold=True) == {
        "added": 0,
        "unchanged": 4,
        "gold_corrected": 0,
        "rows": 4,
    }
    store.close()


@pytest.mark.parametrize(
    "change",
    ["a response", "an answer added to a plain prompt", "the answer dropped"],
)
def test_correct_gold_changes_nothing_but_a_stored_answer(db, tmp_path, change):
    store = open_store(db, gold_rate=1.0)
    records = items(1) + items(1, prefix="g", gold="A > B > C")
    assert import_candidates(store, write_jsonl(tmp_path / "c.jsonl", records))["added"] == 2
    if change == "a response":
        records[1] = {**records[1], "gold": "B > A > C"}
        records[1]["candidates"] = [
            {**records[1]["candidates"][0], "text": "changed"},
            *records[1]["candidates"][1:],
        ]
    elif change == "an answer added to a plain prompt":
        records[0] = {**records[0], "gold": "A > B"}
    else:
        records[1] = {k: v for k, v in records[1].items() if k != "gold"}
    with pytest.raises(StoreError, match="already imported with different content"):
        import_candidates(store, write_jsonl(tmp_path / "changed.jsonl", records), correct_gold=True)
    assert store.gold_answers() == {"g0": "A > B > C"}
    store.close()


def test_the_gold_items_are_found_through_their_index_in_serve_order(db):
    """Schema v8: the choice's look-up of the next gold item reads the partial index instead of
    scanning and sorting every prompt (experiments/benchmarks/bench_store_choice.py)."""
    store = open_store(db, gold_rate=0.5)
    if is_url(db):
        rows = store.conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'prompts'")
        definitions = {row["indexname"]: row["indexdef"] for row in rows.fetchall()}
        assert "gold IS NOT NULL" in definitions["prompts_gold"]
    else:
        query = "SELECT prompt_id FROM prompts WHERE gold IS NOT NULL ORDER BY serve_order, seq LIMIT 1"
        plan = " ".join(str(row[-1]) for row in store.conn.execute("EXPLAIN QUERY PLAN " + query).fetchall())
        assert "prompts_gold" in plan and "TEMP B-TREE" not in plan
    store.close()
