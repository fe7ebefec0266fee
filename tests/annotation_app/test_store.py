"""The annotation store: idempotency, leases, quorum, concurrency, migration, bad input."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from annotation_app import schema
from annotation_app import store as store_mod
from annotation_app.store import Store, StoreError
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
def store(tmp_path, clock):
    s = Store(tmp_path / "lab.db", clock=clock)
    s.upsert_project("default", quorum=2, lease_seconds=60)
    s.add_items(make_records(3))
    for name in ("ann1", "ann2", "ann3"):
        s.add_user(name, "password-" + name)
    s.add_user("boss", "password-boss", "admin")
    yield s
    s.close()


def test_pragmas_and_schema(store):
    conn = store.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert store.schema_version() == store_mod.SCHEMA_VERSION
    assert store.integrity_check() == "ok"


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


def test_login_throttle():
    clock = Clock(0.0)
    throttle = store_mod.LoginThrottle(max_failures=3, window_s=60, clock=clock)
    for _ in range(3):
        assert throttle.allowed("ann1")
        throttle.record("ann1", False)
    assert not throttle.allowed("ann1") and throttle.allowed("ann2")  # per user name
    clock.t = 61
    assert throttle.allowed("ann1")  # the window passed
    throttle.record("ann1", True)
    assert "ann1" not in throttle._failures


def test_submit_is_idempotent_on_client_token(store):
    item = store.next_item("ann1")
    first = store.submit("ann1", item.prompt_id, "b=a>d>c", client_token="t1")
    assert (first.status, first.ranking, first.duplicate) == ("submitted", "A = B > D > C", False)
    again = store.submit("ann1", item.prompt_id, "b=a>d>c", client_token="t1")
    assert again.duplicate and again.ranking == first.ranking
    with pytest.raises(StoreError) as e:  # a second, different submit for a done prompt
        store.submit("ann1", item.prompt_id, "a>b>c>d", client_token="t2")
    assert e.value.code == "already_done"
    rows = store.conn.execute("SELECT COUNT(*) FROM rankings WHERE status='submitted'").fetchone()[0]
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
    with pytest.raises(sqlite3.IntegrityError):
        with store.write() as conn:
            conn.execute("DELETE FROM audit_log")
    with pytest.raises(sqlite3.IntegrityError):
        with store.write() as conn:
            conn.execute("UPDATE audit_log SET action = 'x'")


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


def test_concurrent_threads_store_every_submit_exactly_once(tmp_path):
    s = Store(tmp_path / "c.db")
    s.upsert_project("default", quorum=3)
    s.add_items(make_records(40, k=3))
    users = [f"u{i}" for i in range(12)]
    for u in users:
        s.add_user(u, "password-123")
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
        except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = s.conn.execute("SELECT prompt_id, username FROM rankings WHERE status='submitted'").fetchall()
    assert sorted((r["username"], r["prompt_id"]) for r in rows) == sorted(acked)
    assert len(rows) == 40 * 3  # every prompt reached its quorum, nobody twice (UNIQUE)
    per_prompt = s.conn.execute(
        "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM rankings GROUP BY prompt_id)"
    ).fetchone()
    assert per_prompt[0] == 3
    assert s.integrity_check() == "ok"


def test_migration_from_version_1_keeps_data(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)")
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
    conn.close()
    s = Store(path)
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    assert s.verify_password("old", "old-password")
    [row] = s.submitted_rankings()
    assert (row["ranking"], row["annotator"], row["revision"]) == ("A > B", "old", 0)
    assert s.project("default")["lease_seconds"] == store_mod.DEFAULT_LEASE_SECONDS
    assert (
        s.conn.execute("SELECT n_submitted FROM prompts WHERE prompt_id = 'p0'").fetchone()[0] == 1
    )  # v3 backfill
    assert s.progress("old")["prompts_needing_rankings"] == 1  # quorum 2, one ranking so far
    assert Store(path).schema_version() == store_mod.SCHEMA_VERSION  # re-opening is a no-op


def test_newer_schema_is_refused(tmp_path):
    s = Store(tmp_path / "n.db")
    with s.write() as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(StoreError) as e:
        Store(tmp_path / "n.db")
    assert e.value.code == "schema_too_new"
