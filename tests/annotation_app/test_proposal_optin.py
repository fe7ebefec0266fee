"""Pre-annotation opt-in: an annotator may choose to see a model's proposed ranking; each ranking
records whether it was shown, and the dashboard reports the model's agreement apart for rankings
made with and without it. Store tests run on SQLite and PostgreSQL (``db``, conftest.py)."""

from __future__ import annotations

import json
import math

import pytest

from annotation_app import dashboard, handlers, schema
from annotation_app import store as store_mod
from annotation_app.agreement import cohen_kappa, kendall_tau_b, proposal_outcomes
from annotation_app.app import build_app
from annotation_app.database import open_database
from annotation_app.handlers import Page, Props
from annotation_app.store import Store, StoreError
from tests.annotation_app.test_app_http import PASSWORDS, call_private, free_port, login

PROPOSAL = "C > B = D > A"
SHOWN = f"Model's suggestion: {PROPOSAL}"


def records(n: int, labels: str = "ABCD", prefix: str = "p") -> list[dict]:
    return [
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": f"prompt {i}",
            "candidates": [{"label": lab, "text": f"answer {lab}{i}"} for lab in labels],
        }
        for i in range(n)
    ]


def make_store(db: str) -> Store:
    """Three prompts, p0 and p1 with a proposal, p2 without; two annotators and an admin."""
    s = Store(db)
    s.upsert_project("default", quorum=2)
    s.add_items(records(3))
    s.set_proposals({"p0": PROPOSAL, "p1": PROPOSAL}, source="vader")
    for name in ("ann1", "ann2"):
        s.add_user(name, "password-" + name)
    s.add_user("boss", "password-boss", "admin")
    return s


@pytest.fixture()
def store(db):
    s = make_store(db)
    yield s
    s.close()


def shown_column(s: Store, user: str, prompt_id: str):
    return s.conn.execute(
        "SELECT proposal_shown FROM rankings WHERE username = ? AND prompt_id = ?", (user, prompt_id)
    ).fetchone()["proposal_shown"]


# ----------------------------------------------------------------------------- the store


def test_the_opt_in_is_off_by_default_saved_and_audited(store):
    assert not store.shows_proposals("ann1") and not store.shows_proposals("boss")
    store.set_show_proposals("ann1", True)
    assert store.shows_proposals("ann1") and not store.shows_proposals("ann2")
    store.add_user("ann1", "password-new", replace=True)  # a password reset keeps the choice
    assert store.shows_proposals("ann1")
    store.set_show_proposals("ann1", False)
    assert not store.shows_proposals("ann1")
    entries = [e for e in store.audit_log() if e["action"] == "show_proposals"]
    assert [(e["username"], json.loads(e["detail"])) for e in entries] == [
        ("ann1", {"on": False}),
        ("ann1", {"on": True}),
    ]
    for user, on, code in (
        ("ann1", "yes", "bad_input"),
        ("ann1", 1, "bad_input"),
        ("ghost", True, "unknown_user"),
    ):
        with pytest.raises(StoreError) as e:
            store.set_show_proposals(user, on)
        assert e.value.code == code and "\n" not in str(e.value)


def test_an_item_carries_the_proposal_only_for_an_annotator_who_opted_in(store):
    item = store.next_item("ann1")
    assert item.prompt_id == "p0" and item.proposal is None
    assert "proposal" not in item.to_dict() and PROPOSAL not in json.dumps(item.to_dict())
    store.set_show_proposals("ann2", True)
    seen = store.next_item("ann2")  # p1: ann1 holds p0
    assert seen.prompt_id == "p1" and seen.proposal == PROPOSAL and seen.to_dict()["proposal"] == PROPOSAL
    assert store.leased_proposal("ann2", "p1") == PROPOSAL
    assert store.leased_proposal("ann1", "p0") is None  # not opted in
    with pytest.raises(StoreError) as e:  # only a prompt leased to the caller
        store.leased_proposal("ann2", "p0")
    assert e.value.code == "not_assigned"


def test_proposal_shown_is_recorded_at_submit_and_kept_by_a_revision(store):
    # ann1 never opts in: 0 on a proposed prompt, NULL on one without a proposal.
    # ann2 opts in: 1 on a proposed prompt, NULL without; the choice at submit time counts.
    for prompt_id in ("p0", "p1", "p2"):
        assert store.next_item("ann1").prompt_id == prompt_id
        store.submit("ann1", prompt_id, "A > B > C > D")
    item = store.next_item("ann2")
    assert item.proposal is None  # leased before opting in ...
    store.set_show_proposals("ann2", True)  # ... then ticked the box: the page shows it now
    store.submit("ann2", item.prompt_id, PROPOSAL)
    store.save_draft("ann2", store.next_item("ann2").prompt_id, "A")  # a draft row first, then the submit
    store.submit("ann2", "p1", "A > B > C > D")
    store.next_item("ann2")
    store.submit("ann2", "p2", "A > B > C > D")
    assert [shown_column(store, "ann1", p) for p in ("p0", "p1", "p2")] == [0, 0, None]
    assert [shown_column(store, "ann2", p) for p in ("p0", "p1", "p2")] == [1, 1, None]
    exported = {(r["annotator"], r["prompt_id"]): r["proposal_shown"] for r in store.submitted_rankings()}
    assert exported[("ann1", "p0")] is False and exported[("ann2", "p0")] is True
    assert exported[("ann1", "p2")] is None and exported[("ann2", "p2")] is None
    seen = {(r["annotator"], r["prompt_id"]): r["seen_proposal"] for r in store.submitted_rankings()}
    assert [seen[("ann2", p)] for p in ("p0", "p1", "p2")] == [PROPOSAL, PROPOSAL, None]
    assert [seen[("ann1", p)] for p in ("p0", "p1", "p2")] == [None, None, None]
    store.set_show_proposals("ann1", True)
    store.revise("ann1", "p0", "D > C > B > A")  # the history tab shows no proposal: kept as made
    assert shown_column(store, "ann1", "p0") == 0
    # a new proposal (propose run again) replaces the prompt's, not the one ann2 saw
    store.set_proposals({"p0": "A > B > C > D"}, source="another model")
    store.revise("ann2", "p0", "D > C > B > A")
    seen = {(r["annotator"], r["prompt_id"]): r["seen_proposal"] for r in store.submitted_rankings()}
    assert (seen[("ann2", "p0")], seen[("ann1", "p0")]) == (PROPOSAL, None)


def test_an_arena_vote_never_counts_as_shown(store):
    store.upsert_project("duel", quorum=1, kind="arena")
    store.add_items(records(1, labels="AB", prefix="duel"), project_id="duel")
    store.set_proposals({"duel0": "A > B"}, source="vader")
    store.set_show_proposals("ann1", True)
    item = store.next_item("ann1", kind="arena")
    assert item.proposal is None  # the arena shows no suggestion
    store.submit("ann1", item.prompt_id, "A > B")
    assert shown_column(store, "ann1", "duel0") is None


def test_migration_from_version_6_keeps_data(db):
    database = open_database(db)  # a database as version 6 of the store left it
    with database.transaction() as conn:
        conn.execute(
            conn.ddl("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)")
        )
        for version, step in schema.MIGRATIONS[:6]:
            step(conn)
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        kdf, salt, digest = store_mod.hash_password("old-password")
        conn.execute(
            "INSERT INTO annotators (username, role, kdf, salt, pw_hash, created_at) "
            "VALUES ('old', 'annotator', ?, ?, ?, 0)",
            (kdf, salt, digest),
        )
        conn.execute("INSERT INTO projects (project_id, quorum, created_at) VALUES ('default', 2, 0)")
        conn.execute(
            "INSERT INTO prompts (prompt_id, project_id, seq, serve_order, prompt_json, prompt_text, "
            "content_hash, proposal, proposal_source, n_submitted, created_at) "
            "VALUES ('p0', 'default', 1, 1, '\"hi\"', 'hi', 'h', 'B > A', 'vader', 1, 0)"
        )
        for lab in "AB":
            conn.execute("INSERT INTO candidates VALUES ('p0', ?, 'x', '', '{}')", (lab,))
        conn.execute(
            "INSERT INTO rankings (prompt_id, username, status, ranking, tiers_json, created_at, updated_at, "
            "submitted_at) VALUES ('p0', 'old', 'submitted', 'A > B', '[[\"A\"],[\"B\"]]', 5, 7, 7)"
        )
    database.close()
    s = Store(db)
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    assert s.verify_password("old", "old-password") and not s.shows_proposals("old")
    [row] = s.submitted_rankings()
    assert (row["ranking"], row["annotator"], row["proposal_shown"], row["seen_proposal"]) == (
        "A > B",
        "old",
        None,
        None,
    )
    assert s.proposals() == {"p0": {"ranking": "B > A", "source": "vader"}}
    migrated = [json.loads(e["detail"]) for e in s.audit_log() if e["action"] == "migrate"]
    assert sorted(m["version"] for m in migrated) == list(range(7, store_mod.SCHEMA_VERSION + 1))
    with pytest.raises(s.db.IntegrityError):  # the new columns hold 0 or 1 only
        with s.write() as conn:
            conn.execute("UPDATE annotators SET show_proposals = 2")
    s.close()


# ----------------------------------------------------------------------------- the page and the API


@pytest.fixture()
def page(tmp_path):
    s = make_store(str(tmp_path / "lab.db"))
    yield Page.for_store(s)
    s.close()


def test_the_page_shows_the_suggestion_only_after_opting_in(page):
    out = handlers.load(page, "ann1")
    assert out["prompt-id"] == "p0" and out["show-proposals"] is False
    assert out["proposal"] == Props(visible=False, value="")
    assert PROPOSAL not in str(out)
    api = handlers.api_next(page, "ann1")
    assert "proposal" not in api and PROPOSAL not in json.dumps(api)

    out = handlers.show_proposals_changed(page, "ann1", True, "p0")
    assert out == {
        "proposal": Props(visible=True, value=SHOWN),
        "message": "The model's suggested ranking is shown above the board when there is one.",
    }
    assert handlers.load(page, "ann1")["show-proposals"] is True  # kept across page loads
    assert handlers.next_item(page, "ann1")["proposal"] == Props(visible=True, value=SHOWN)
    assert handlers.api_next(page, "ann1")["proposal"] == PROPOSAL
    after = handlers.submit(page, "ann1", "p0", "tok", "A > B > C > D", False, "")
    assert after["prompt-id"] == "p1" and after["proposal"] == Props(visible=True, value=SHOWN)
    after = handlers.submit(page, "ann1", "p1", "tok2", "A > B > C > D", False, "")
    assert after["prompt-id"] == "p2" and after["proposal"] == Props(visible=False, value="")  # none

    off = handlers.show_proposals_changed(page, "ann1", False, "p2")
    assert off["proposal"] == Props(visible=False, value="") and off["message"].endswith("is hidden.")
    assert handlers.show_proposals_changed(page, "ann1", True, "")["proposal"] == Props(
        visible=False, value=""
    )
    refused = handlers.show_proposals_changed(page, "ann2", True, "p1")  # not leased to ann2
    assert refused == {
        "message": "Error: prompt 'p1' is not assigned to you; press Next to get your next prompt"
    }
    assert page.store.shows_proposals("ann2")  # the choice itself was saved


def test_every_page_event_is_private_and_the_toggle_is_wired(tmp_path):
    s = make_store(str(tmp_path / "lab.db"))
    demo = build_app(s)
    public = {f.api_name for f in demo.fns.values() if f.api_visibility == "public"}
    assert public == {"next", "submit", "skip"}  # the named API only
    [toggle] = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_show_proposals"]
    assert [b.elem_id for b in toggle.inputs] == ["show-proposals", "prompt-id"]
    assert [b.elem_id for b in toggle.outputs] == ["proposal", "message"]
    s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from annotation_app.server import launch

    s = Store(tmp_path_factory.mktemp("optin") / "lab.db")
    s.upsert_project("default", quorum=2)
    s.add_items(records(2, labels="ABC"))
    s.set_proposals({"p0": "C > B > A", "p1": "C > B > A"}, source="vader")
    for user in ("ann1", "ann2"):
        s.add_user(user, PASSWORDS[user])
    demo, url = launch(s, port=free_port(), block=False, quiet=True)
    yield {"url": url.rstrip("/"), "store": s, "demo": demo}
    demo.close()
    s.close()


def test_over_http_only_the_opted_in_annotator_gets_the_suggestion(server):
    from gradio_client import Client

    http1 = login(server, "ann1")
    assert "C > B > A" not in http1.get("/").text
    loaded = call_private(server, http1, "on_load", [])
    assert "C > B > A" not in json.dumps(loaded)
    api1 = Client(server["url"], auth=("ann1", PASSWORDS["ann1"]), verbose=False, analytics_enabled=False)
    item = api1.predict(api_name="/next")
    assert item["ok"] and "proposal" not in item and "C > B > A" not in json.dumps(item)

    http2 = login(server, "ann2")
    pid = call_private(server, http2, "on_load", [])["data"][0]  # the first output: prompt-id
    out = call_private(server, http2, "on_show_proposals", [True, pid])
    assert "Model's suggestion: C > B > A" in json.dumps(out)
    api2 = Client(server["url"], auth=("ann2", PASSWORDS["ann2"]), verbose=False, analytics_enabled=False)
    assert api2.predict(api_name="/next")["proposal"] == "C > B > A"
    bad = call_private(server, http2, "on_show_proposals", ["yes", pid])  # checked like every event
    assert bad["error"].startswith("Bad request: on_show_proposals: on must be true or false")


# ----------------------------------------------------------------------------- the dashboard


def test_the_dashboard_splits_the_agreement_into_shown_and_hidden(tmp_path):
    """By hand: proposal A > B = C on two prompts; ann1 sees it and ranks the same (κ 1, τ-b 1),
    ann2 does not and ranks it reversed, B = C > A (κ 0.25, τ-b -1); all four: κ 0.5, τ-b 0.

    A proposal with a tie, because κ is undefined when both raters only ever say "wins"."""
    s = Store(tmp_path / "lab.db")
    s.upsert_project("default", quorum=2)
    s.add_items(records(2, labels="ABC"))
    s.set_proposals({"p0": "A > B = C", "p1": "A > B = C"}, source="vader")
    for name in ("ann1", "ann2", "boss"):
        s.add_user(name, "password-" + name, "admin" if name == "boss" else "annotator")
    page = Page.for_store(s)
    before = handlers.admin_statistics(page, "boss")
    s.set_show_proposals("ann1", True)
    for user, order in (("ann1", "A > B = C"), ("ann2", "B = C > A")):
        for _ in range(2):
            s.submit(user, s.next_item(user).prompt_id, order)
    stats = handlers.admin_statistics(page, "boss")
    rows = {row[0]: row[1:] for row in stats["admin-headline"].rows if row[0].startswith("model pre-ranking")}
    assert rows == {
        "model pre-ranking vs annotators: Cohen κ (pairs) — vader": ["0.500", "[0.500, 0.500]"],
        "model pre-ranking vs annotators: Kendall τ-b": ["0.000", "[0.000, 0.000]"],
        "model pre-ranking vs annotators: Cohen κ (pairs), suggestion shown (2 rankings)": [
            "1.000",
            "[1.000, 1.000]",
        ],
        "model pre-ranking vs annotators: Kendall τ-b, suggestion shown": ["1.000", "[1.000, 1.000]"],
        "model pre-ranking vs annotators: Cohen κ (pairs), suggestion hidden (2 rankings)": [
            "0.250",
            "[0.250, 0.250]",
        ],
        "model pre-ranking vs annotators: Kendall τ-b, suggestion hidden": ["-1.000", "[-1.000, -1.000]"],
    }
    # the same numbers as the agreement functions on each subset
    proposed = [["A"], ["B", "C"]]
    rankings = s.submitted_rankings()
    for shown, kappa_text, tau_text in ((True, "1.000", "1.000"), (False, "0.250", "-1.000")):
        subset = [r for r in rankings if r["proposal_shown"] is shown]
        kappa = cohen_kappa([o for r in subset for o in proposal_outcomes(proposed, r["tiers"])])
        taus = [kendall_tau_b(proposed, r["tiers"]) for r in subset]
        assert (f"{kappa:.3f}", f"{sum(taus) / len(taus):.3f}") == (kappa_text, tau_text)
    per_prompt = {row[0]: dict(zip(dashboard.PROPOSAL_COLUMNS, row)) for row in stats["admin-proposals"].rows}
    assert per_prompt["p0"]["human_rankings"] == 2 and per_prompt["p0"]["saw_proposal"] == 1
    assert stats["admin-proposals"].columns == dashboard.PROPOSAL_COLUMNS
    # before anyone saw a proposal: the overall rows only, as before the opt-in existed
    assert sum(row[0].startswith("model pre-ranking") for row in before["admin-headline"].rows) == 2
    # A new model proposes the reverse, B = C > A (propose run again). The shown rows still judge
    # ann1 against the A > B = C ann1 saw (κ 1, τ-b 1); the overall and hidden rows judge the new
    # proposal, which ann2 matches (hidden: κ 1, τ-b 1) and ann1 reverses (all four: κ 0.5, τ-b 0).
    s.set_proposals({"p0": "B = C > A", "p1": "B = C > A"}, source="reranker")
    stats = handlers.admin_statistics(page, "boss")
    rows = {row[0]: row[1] for row in stats["admin-headline"].rows if row[0].startswith("model pre-ranking")}
    assert rows == {
        "model pre-ranking vs annotators: Cohen κ (pairs) — reranker": "0.500",
        "model pre-ranking vs annotators: Kendall τ-b": "0.000",
        "model pre-ranking vs annotators: Cohen κ (pairs), suggestion shown (2 rankings)": "1.000",
        "model pre-ranking vs annotators: Kendall τ-b, suggestion shown": "1.000",
        "model pre-ranking vs annotators: Cohen κ (pairs), suggestion hidden (2 rankings)": "1.000",
        "model pre-ranking vs annotators: Kendall τ-b, suggestion hidden": "1.000",
    }
    s.close()


def test_no_ranking_shown_means_no_split():
    proposals = {"p0": {"ranking": "A > B > C", "source": "vader"}}
    recs = [
        {"prompt_id": "p0", "annotator": a, "tiers": [["A"], ["B"], ["C"]], "proposal_shown": shown}
        for a, shown in (("ann1", False), ("ann2", None))
    ]
    headline = dashboard.proposal_headline(proposals, recs)
    assert len(headline) == 2 and headline[1][1] == "1.000"
    assert math.isnan(cohen_kappa([(1, 1)]))  # why the hand-checked case above proposes a tie
    assert dashboard.proposal_rows(proposals, recs)[0][-1] == 0
