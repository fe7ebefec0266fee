"""The annotation store: idempotency, leases, quorum, concurrency, migration, bad input, edits.

Every test that takes ``db`` runs twice: on a SQLite file and on a PostgreSQL database
(tests/annotation_app/conftest.py starts a throwaway server, or skips those runs saying why).
"""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from annotation_app import schema
from annotation_app import store as store_mod
from annotation_app.database import open_database
from annotation_app.io import export_rankings
from annotation_app.store import Store, StoreError
from rlhf.data import load_rankings
from rlhf.rankings import RankingError


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_records(n: int, k: int = 4, prefix: str = "p") -> list[dict]:
    labels = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:k]
    return [
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": f"prompt {i}",
            "candidates": [
                {"label": lab, "text": f"response {lab} to {i}", "model": "m", "gen": {}} for lab in labels
            ],
        }
        for i in range(n)
    ]


@pytest.fixture()
def clock():
    return Clock()


@pytest.fixture()
def store(db, clock):
    s = Store(db, clock=clock)
    s.upsert_project("default", quorum=2, lease_seconds=60)
    s.add_items(make_records(3))
    for name in ("ann1", "ann2", "ann3"):
        s.add_user(name, "password-" + name)
    s.add_user("boss", "password-boss", "admin")
    yield s
    s.close()


def test_connection_settings_and_schema(store):
    conn = store.conn
    if store.db.dialect == "sqlite":
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    else:
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "30s"
        # epoch seconds need 8-byte floats (PostgreSQL's real has 4) and row ids are identities
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'rankings'"
            ).fetchall()
        )
        assert types["updated_at"] == "double precision" and types["ranking_id"] == "bigint"
        assert types["edit"] == "text"
        # with amcheck installed, integrity_check also checks every index of the store's tables
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    assert store.schema_version() == store_mod.SCHEMA_VERSION
    assert store.integrity_check() == "ok"
    assert [m[0] for m in schema.MIGRATIONS] == list(range(1, store_mod.SCHEMA_VERSION + 1))


def test_integrity_check_sees_a_wrong_count(store):
    item = store.next_item("ann1")
    store.submit("ann1", item.prompt_id, "A > B > C > D")
    with store.write() as conn:
        conn.execute("UPDATE prompts SET n_submitted = 5 WHERE prompt_id = ?", (item.prompt_id,))
    assert store.integrity_check() == f"prompt {item.prompt_id!r} counts 5 submitted rankings but has 1"


def test_passwords_are_salted_and_checked(store):
    assert store.verify_password("ann1", "password-ann1")
    assert not store.verify_password("ann1", "password-ann2")
    assert not store.verify_password("nobody", "password-ann1")
    rows = store.conn.execute(
        "SELECT salt, pw_hash, kdf FROM annotators WHERE username IN ('ann1','ann2')"
    ).fetchall()
    assert rows[0]["salt"] != rows[1]["salt"] and rows[0]["kdf"].startswith("scrypt:")
    assert "password" not in rows[0]["pw_hash"]
    with pytest.raises(StoreError) as e:
        store.add_user("ann1", "password-x")
    assert e.value.code == "duplicate_user"
    with pytest.raises(StoreError) as e:
        store.add_user("x", "short")
    assert e.value.code == "weak_password"
    with pytest.raises(StoreError) as e:
        store.add_user("x", "longenough", role="god")
    assert e.value.code == "bad_role"
    with pytest.raises(StoreError) as e:
        store.add_user("<script>", "longenough")
    assert e.value.code == "bad_username"


def test_submit_is_idempotent_on_client_token(store):
    item = store.next_item("ann1")
    first = store.submit("ann1", item.prompt_id, "b=a>d>c", client_token="t1")
    assert (first.status, first.ranking, first.duplicate) == ("submitted", "A = B > D > C", False)
    again = store.submit("ann1", item.prompt_id, "b=a>d>c", client_token="t1")
    assert again.duplicate and again.ranking == first.ranking
    with pytest.raises(StoreError) as e:  # a second, different submit for a done prompt
        store.submit("ann1", item.prompt_id, "a>b>c>d", client_token="t2")
    assert e.value.code == "already_done"
    rows = store.conn.execute("SELECT COUNT(*) FROM rankings WHERE status = 'submitted'").fetchone()[0]
    assert rows == 1
    assert [r["action"] for r in store.audit_log()].count("submit") == 1


def test_quorum_least_annotated_and_never_twice(store):
    # quorum 2 over 3 prompts: 6 rankings in all, each prompt by 2 distinct annotators.
    done: dict[str, list[str]] = {}
    for user in ("ann1", "ann2", "ann3", "ann1", "ann2", "ann3", "ann1", "ann2", "ann3"):
        item = store.next_item(user)
        if item is None:
            continue
        assert user not in done.get(item.prompt_id, [])
        store.submit(user, item.prompt_id, "A > B > C > D")
        done.setdefault(item.prompt_id, []).append(user)
    assert sorted(len(v) for v in done.values()) == [2, 2, 2]
    assert all(store.next_item(u) is None for u in ("ann1", "ann2", "ann3", "boss"))
    # least-annotated first (live leases count): the first three leases went to three different prompts
    order = [r["prompt_id"] for r in reversed(store.audit_log()) if r["action"] == "lease"]
    assert len(set(order[:3])) == 3
    counts = store.conn.execute("SELECT prompt_id, n_submitted FROM prompts").fetchall()
    assert all(r["n_submitted"] == 2 for r in counts)


def test_leases_expire_and_return_to_pool(store, clock):
    store.upsert_project("default", quorum=1)
    a = store.next_item("ann1")
    assert store.next_item("ann1").prompt_id == a.prompt_id  # the live lease is returned again
    b = store.next_item("ann2")
    assert b.prompt_id != a.prompt_id  # ann1's leased prompt is taken (quorum 1)
    clock.t += 61  # ann1 walked away; the lease expired
    with pytest.raises(StoreError) as e:
        store.submit("ann1", a.prompt_id, "A > B > C > D")
    assert e.value.code == "lease_expired"
    c = store.next_item("ann3")
    assert c.prompt_id == a.prompt_id  # back in the pool
    store.submit("ann3", c.prompt_id, "A > B > C > D")
    assert store.stats()["prompts"][0]["submitted"] == 1


def test_drafts_renew_lease_and_are_restored(store, clock):
    item = store.next_item("ann1")
    store.save_draft("ann1", item.prompt_id, "C > B", ["all-bad"], "hmm")
    clock.t += 50
    store.save_draft("ann1", item.prompt_id, "C > B =", [], "hmm")  # half typed: kept as typed
    clock.t += 50  # 100 s after the lease, but the draft 50 s ago renewed it
    again = store.next_item("ann1")
    assert again.prompt_id == item.prompt_id
    assert again.draft == {"ranking": "C > B =", "flags": [], "comment": "hmm"}
    res = store.submit("ann1", item.prompt_id, "C > B = D > A", client_token="x")
    assert res.ranking == "C > B = D > A"
    # a draft event that arrives after the submit is stale: ignored, the submission untouched
    assert store.save_draft("ann1", item.prompt_id, "A > B") is False
    assert store.submitted_rankings()[0]["ranking"] == "C > B = D > A"
    assert store.progress("ann1")["submitted"] == 1 and store.progress("ann1")["drafts"] == 0


def test_bad_submits_store_nothing(store):
    item = store.next_item("ann1")
    other = store.next_item("ann2")
    cases = [
        (("ann1", "nope", "A > B > C > D"), "unknown_prompt"),
        (("ann1", other.prompt_id, "A > B > C > D"), "not_assigned"),
        (("ann1", item.prompt_id, "A > B > C > E"), "unknown_label"),
        (("ann1", item.prompt_id, "C > B"), "missing_label"),
        (("ann1", item.prompt_id, "A > B > A > C > D"), "duplicate_label"),
        (("ann1", item.prompt_id, "A >> B"), "syntax"),
        (("ann1", item.prompt_id, ""), "empty"),
        (("ann1", item.prompt_id, "A" * 300), "too_long"),
        (("mallory", item.prompt_id, "A > B > C > D"), "unknown_user"),
    ]
    for args, code in cases:
        with pytest.raises((StoreError, RankingError)) as e:
            store.submit(*args)
        assert e.value.code == code, args
    with pytest.raises(StoreError) as e:
        store.submit("ann1", item.prompt_id, "A > B > C > D", flags=["gold"])
    assert e.value.code == "bad_flag"
    with pytest.raises(StoreError) as e:
        store.submit("ann1", item.prompt_id, "A > B > C > D", comment="x" * 6000)
    assert e.value.code == "too_long"
    assert store.conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 0


def test_all_bad_without_ranking_is_an_all_tied_ranking(store):
    item = store.next_item("ann1")
    res = store.submit("ann1", item.prompt_id, "", flags=["all_bad"])
    assert res.ranking == "A = B = C = D" and res.flags == ["all_bad"]


def test_skip_and_revise(store):
    item = store.next_item("ann1")
    store.skip("ann1", item.prompt_id)
    nxt = store.next_item("ann1")
    assert nxt.prompt_id != item.prompt_id
    store.submit("ann1", nxt.prompt_id, "A > B > C > D")
    rev = store.revise("ann1", nxt.prompt_id, "D > C = B > A", client_token="r1")
    assert rev.ranking == "D > B = C > A" and rev.revision == 1
    assert store.revise("ann1", nxt.prompt_id, "D > C = B > A", client_token="r1").duplicate
    with pytest.raises(StoreError) as e:  # someone else's ranking cannot be revised
        store.revise("ann2", nxt.prompt_id, "A > B > C > D")
    assert e.value.code == "not_submitted"
    with pytest.raises(StoreError):
        store.revise("ann1", item.prompt_id, "A > B > C > D")  # skipped, not submitted
    old = [r for r in store.audit_log() if r["action"] == "revise"][0]
    assert '"old": "A > B > C > D"' in old["detail"]
    hist = store.history("ann1")
    assert {h["prompt_id"]: h["status"] for h in hist} == {
        item.prompt_id: "skipped",
        nxt.prompt_id: "submitted",
    }
    assert store.history("ann2") == []


def test_audit_log_is_append_only(store):
    n = len(store.audit_log())
    statements = ["DELETE FROM audit_log", "UPDATE audit_log SET action = 'x'"]
    if store.db.dialect == "postgresql":
        statements.append("TRUNCATE audit_log")
    for statement in statements:
        with pytest.raises(store.db.IntegrityError, match="append-only"):
            with store.write() as conn:
                conn.execute(statement)
    assert len(store.audit_log()) == n


def test_imports_are_idempotent_and_conflicts_refused(store):
    assert store.add_items(make_records(3)) == {"added": 0, "unchanged": 3}
    changed = make_records(3)
    changed[1]["candidates"][0]["text"] = "different"
    with pytest.raises(StoreError) as e:
        store.add_items(changed + make_records(2, prefix="new"))
    assert e.value.code == "import_conflict" and "row 2" in str(e.value)
    assert store.counts()["prompts"] == 3  # nothing from the refused import


def test_admin_check(store):
    assert store.require_admin("boss") == "boss"
    with pytest.raises(StoreError) as e:
        store.require_admin("ann1")
    assert e.value.code == "not_admin"


def annotate_until_done(db: str, users: list[str]) -> list[tuple[str, str]]:
    """One thread per user: next → submit twice with the same token, until nothing is left.
    Returns the acknowledged (user, prompt_id) pairs; raises the first error of any thread.
    (Module level: the process test runs it in child processes.)"""
    s = Store(db)
    acked: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(user: str) -> None:
        try:
            while True:
                item = s.next_item(user)
                if item is None:
                    return
                for _ in range(2):  # double submit with the same token
                    res = s.submit(user, item.prompt_id, "A > B = C", client_token=f"{user}-{item.prompt_id}")
                with lock:
                    acked.append((user, res.prompt_id))
        except BaseException as err:  # noqa: BLE001 - surfaced in the calling thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    if errors:
        raise errors[0]
    return acked


def prepare_crowd(db: str, n_prompts: int, n_users: int) -> list[str]:
    s = Store(db)
    s.upsert_project("default", quorum=3)
    s.add_items(make_records(n_prompts, k=3))
    users = [f"u{i}" for i in range(n_users)]
    for u in users:
        s.add_user(u, "password-123")
    s.close()
    return users


def check_exactly_once(db: str, acked: list[tuple[str, str]], n_prompts: int) -> None:
    s = Store(db)
    rows = s.conn.execute("SELECT prompt_id, username FROM rankings WHERE status = 'submitted'").fetchall()
    assert sorted((r["username"], r["prompt_id"]) for r in rows) == sorted(acked)
    assert len(rows) == n_prompts * 3  # every prompt reached its quorum, nobody twice (UNIQUE)
    per_prompt = s.conn.execute(
        "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM rankings GROUP BY prompt_id) AS counts"
    ).fetchone()
    assert per_prompt[0] == 3
    assert [r["action"] for r in s.audit_log(10_000)].count("submit") == len(acked)
    assert s.integrity_check() == "ok"
    s.close()


def test_concurrent_threads_store_every_submit_exactly_once(db):
    users = prepare_crowd(db, n_prompts=40, n_users=12)
    check_exactly_once(db, annotate_until_done(db, users), n_prompts=40)


def test_concurrent_processes_store_every_submit_exactly_once(db):
    # Three processes of four threads each: the write lock must hold across processes too.
    users = prepare_crowd(db, n_prompts=30, n_users=12)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each, as separate app servers
    with spawn.Pool(3) as pool:
        results = pool.starmap(annotate_until_done, [(db, users[i::3]) for i in range(3)])
    check_exactly_once(db, [pair for acked in results for pair in acked], n_prompts=30)


def test_migration_from_version_1_keeps_data(db):
    database = open_database(db)  # a database as version 1 of the store left it
    with database.transaction() as conn:
        conn.execute(
            conn.ddl("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)")
        )
        schema._v1(conn)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        kdf, salt, digest = store_mod.hash_password("old-password")
        conn.execute("INSERT INTO annotators VALUES ('old', 'annotator', ?, ?, ?, 0)", (kdf, salt, digest))
        conn.execute("INSERT INTO projects VALUES ('default', 2, '', 0)")
        conn.execute("INSERT INTO prompts VALUES ('p0', 'default', 1, '\"hi\"', 'hi', 'h', 0)")
        for lab in "AB":
            conn.execute("INSERT INTO candidates VALUES ('p0', ?, 'x', '', '{}')", (lab,))
        conn.execute(
            "INSERT INTO rankings (prompt_id, username, status, ranking, tiers_json, created_at, updated_at) "
            "VALUES ('p0', 'old', 'submitted', 'A > B', '[[\"A\"],[\"B\"]]', 5, 7)"
        )
    database.close()
    s = Store(db)
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    assert s.verify_password("old", "old-password")
    [row] = s.submitted_rankings()
    assert (row["ranking"], row["annotator"], row["revision"]) == ("A > B", "old", 0)
    assert s.project("default")["lease_seconds"] == store_mod.DEFAULT_LEASE_SECONDS
    assert (
        s.conn.execute("SELECT n_submitted FROM prompts WHERE prompt_id = 'p0'").fetchone()[0] == 1
    )  # v3 backfill
    assert s.progress("old")["prompts_needing_rankings"] == 1  # quorum 2, one ranking so far
    assert "edit" not in row  # v4: the column exists, empty
    with pytest.raises(s.db.IntegrityError):  # v2: the audit log became append-only
        with s.write() as conn:
            conn.execute("DELETE FROM audit_log")
    s.close()
    again = Store(db)
    assert again.schema_version() == store_mod.SCHEMA_VERSION  # re-opening is a no-op
    assert [r["action"] for r in again.audit_log()].count("migrate") == store_mod.SCHEMA_VERSION - 1
    again.close()


def test_newer_schema_is_refused(db):
    s = Store(db)
    with s.write() as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    s.close()
    with pytest.raises(StoreError) as e:
        Store(db)
    assert e.value.code == "schema_too_new"


def test_edit_of_the_best_response_is_stored_and_exported(store, tmp_path):
    item = store.next_item("ann1")
    best = item.candidates[2]["text"]  # response C
    store.save_draft("ann1", item.prompt_id, "C > A", edit="half typed")  # a draft keeps it as typed
    assert store.next_item("ann1").draft["edit"] == "half typed"
    res = store.submit("ann1", item.prompt_id, "C > A > B > D", edit=best + " (fixed)")
    assert res.ranking == "C > A > B > D"
    [row] = store.submitted_rankings()
    assert (row["edit"], row["edit_of"]) == (best + " (fixed)", "C")
    mine = store.own_ranking("ann1", item.prompt_id)
    assert (mine["edit"], mine["edit_of"]) == (best + " (fixed)", "C")
    # the export carries it, in every row once any row has one (one set of columns per file)
    other = store.next_item("ann2")
    store.submit("ann2", other.prompt_id, "A > B > C > D")
    out = export_rankings(store, str(tmp_path / "r.jsonl"))
    assert out["rankings"] == 2
    rows = {r["prompt_id"]: r for r in load_rankings(str(tmp_path / "r.jsonl"))}
    assert (rows[item.prompt_id]["edit"], rows[item.prompt_id]["edit_of"]) == (best + " (fixed)", "C")
    assert rows[other.prompt_id]["edit"] is None and rows[other.prompt_id]["edit_of"] is None


def test_no_edit_is_stored_as_null(store):
    item = store.next_item("ann1")
    best = item.candidates[1]["text"]  # response B
    store.submit("ann1", item.prompt_id, "B > A > C > D", edit="  \n")
    assert "edit" not in store.submitted_rankings()[0]
    store.revise("ann1", item.prompt_id, "B > A > C > D", edit=best + "\n")  # the best response as it was
    assert "edit" not in store.own_ranking("ann1", item.prompt_id)
    assert store.conn.execute("SELECT COUNT(*) FROM rankings WHERE edit IS NOT NULL").fetchone()[0] == 0
    other = store.next_item("ann2")
    store.submit("ann2", other.prompt_id, "A > B > C > D")  # no edit given at all
    assert all("edit" not in r for r in store.submitted_rankings())


def test_edits_are_checked(store):
    item = store.next_item("ann1")
    cases = [
        (dict(ranking="A = B > C > D", edit="better"), "edit_needs_single_best"),
        (dict(ranking="", flags=["all_bad"], edit="better"), "edit_needs_single_best"),  # all tied
        (dict(ranking="A > B > C > D", edit="x" * (store_mod.MAX_EDIT_CHARS + 1)), "too_long"),
        (dict(ranking="A > B > C > D", edit=42), "bad_input"),
    ]
    for kwargs, code in cases:
        with pytest.raises(StoreError) as e:
            store.submit("ann1", item.prompt_id, **kwargs)
        assert e.value.code == code, kwargs
    with pytest.raises(StoreError) as e:
        store.save_draft("ann1", item.prompt_id, "A", edit="x" * (store_mod.MAX_EDIT_CHARS + 1))
    assert e.value.code == "too_long"
    assert store.conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 0


def test_revise_changes_the_edit_and_keeps_the_old_one(store):
    item = store.next_item("ann1")
    store.submit("ann1", item.prompt_id, "A > B > C > D", edit="first fix")
    with pytest.raises(StoreError) as e:
        store.revise("ann1", item.prompt_id, "A = B > C > D", edit="second fix")
    assert e.value.code == "edit_needs_single_best"
    store.revise("ann1", item.prompt_id, "D > C > B > A", edit="fix of D")
    mine = store.own_ranking("ann1", item.prompt_id)
    assert (mine["edit"], mine["edit_of"], mine["revision"]) == ("fix of D", "D", 1)
    [entry] = [r for r in store.audit_log() if r["action"] == "revise"]
    assert json.loads(entry["detail"])["old_edit"] == "first fix"
    store.revise("ann1", item.prompt_id, "D > C > B > A")  # no edit: the edit is dropped
    assert "edit" not in store.own_ranking("ann1", item.prompt_id)


def test_database_urls_fail_early_with_one_line():
    pytest.importorskip("psycopg")
    cases = [
        ("mysql://root@localhost/lab", "bad_db_url"),
        ("postgresql://ann@[::1/lab", "bad_db_url"),  # does not parse
        ("postgresql://ann:secret@127.0.0.1:1/lab", "db_unreachable"),  # nothing listens on port 1
    ]
    for url, code in cases:
        with pytest.raises(StoreError) as e:
            Store(url)
        assert e.value.code == code, url
        assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_proposals_are_stored_checked_and_replaced(store):
    assert store.proposals() == {}
    assert store.set_proposals({"p0": "c > a = b > d", "p1": "A > B > C > D"}, source="vader") == 2
    assert store.proposals() == {
        "p0": {"ranking": "C > A = B > D", "source": "vader"},
        "p1": {"ranking": "A > B > C > D", "source": "vader"},
    }
    with pytest.raises(StoreError, match="nope: unknown prompt"):
        store.set_proposals({"p2": "A > B > C > D", "nope": "A > B"}, source="x")
    with pytest.raises(StoreError, match="p2: "):
        store.set_proposals({"p2": "A > Z"}, source="x")
    assert "p2" not in store.proposals()  # nothing written by a refused call
    store.set_proposals({"p0": "B > A > C > D"}, source="rm")
    assert store.proposals()["p0"] == {"ranking": "B > A > C > D", "source": "rm"}
    item = store.next_item("ann1")
    assert "proposal" not in item.to_dict() and all(
        "B > A > C > D" not in str(v) for v in item.to_dict().values()
    )
