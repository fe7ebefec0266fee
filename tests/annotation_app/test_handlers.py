"""The page's and the API's handlers called directly on a real SQLite store: no server, no browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from annotation_app import exports, handlers
from annotation_app.handlers import Page, Props, Table
from annotation_app.store import Store


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "lab.db", clock=Clock())
    s.upsert_project("default", quorum=2, guidelines="Prefer **kind** answers.")
    s.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "candidates": [{"label": lab, "text": f"answer {lab}{i}"} for lab in "ABCD"],
            }
            for i in range(3)
        ]
    )
    s.add_user("ann1", "password-ann1")
    s.add_user("ann2", "password-ann2")
    s.add_user("boss", "password-boss", "admin")
    yield s
    s.close()


@pytest.fixture()
def page(store):
    return Page.for_store(store)


def stored(store: Store) -> list[tuple[str, str, str]]:
    return [(r["prompt_id"], r["annotator"], r["ranking"]) for r in store.submitted_rankings()]


def test_load_shows_the_first_item_and_the_admin_tab_only_to_admins(page):
    assert page.slots == ("A", "B", "C", "D")
    out = handlers.load(page, "ann1")
    assert out["prompt-id"] == "p0" and out["labels"] == "A B C D"
    assert out["prompt"] == Props(visible=True, value="prompt 0")
    assert out["slot-A"] == Props(visible=True) and out["response-A"] == "answer A0"
    assert json.loads(out["board"]) == {"labels": ["A", "B", "C", "D"], "ranking": ""}
    assert out["conversation"] == Props(visible=False, value=[]) and out["edit"] == ""
    assert out["guidelines"] == "Prefer **kind** answers." and out["message"] == ""
    assert out["progress"] == "ann1: 0 submitted, 0 skipped — 3 of 3 prompts still need rankings"
    assert out["history"] == [] and out["history-prompt"] == Props(choices=[])
    assert out["guidelines-box"] == Props(open=True)  # open until the first submission
    assert len(out["client-token"]) == 32
    assert out["admin-tab"] == Props(visible=False)
    assert handlers.load(page, "boss")["admin-tab"] == Props(visible=True)


def test_submit_a_ranking_with_ties_shows_the_next_item(page, store):
    first = handlers.load(page, "ann1")
    out = handlers.submit(page, "ann1", first["prompt-id"], first["client-token"], "b = a > d > c", False, "")
    assert out["message"] == "Saved your ranking of p0: A = B > D > C."
    assert out["prompt-id"] == "p1" and out["ranking"] == "" and "1 submitted" in out["progress"]
    assert out["guidelines-box"] == Props(open=False)
    [row] = store.submitted_rankings()
    assert row["tiers"] == [["A", "B"], ["D"], ["C"]] and row["annotator"] == "ann1"
    rows = handlers.history(page, "ann1")
    assert [r[:3] for r in rows["history"]] == [["p0", "submitted", "A = B > D > C"]]
    assert rows["history-prompt"] == Props(choices=["p0"])


@pytest.mark.parametrize(
    ("ranking", "needle"),
    [("A > E", "E"), ("A > B", "missing"), ("A >> B", ""), ("A" * 1000, "limit is 200")],
)
def test_a_bad_ranking_is_refused_clearly_and_nothing_is_stored(page, store, ranking, needle):
    item = handlers.load(page, "ann1")
    out = handlers.submit(page, "ann1", item["prompt-id"], item["client-token"], ranking, False, "")
    # only the message and the progress change: the page keeps the item and what was typed
    assert set(out) == {"message", "progress"}
    assert out["message"].startswith("Error: ") and needle in out["message"]
    assert stored(store) == []
    assert handlers.next_item(page, "ann1")["prompt-id"] == item["prompt-id"]  # still leased


def test_a_prompt_not_leased_to_the_caller_is_refused(page, store):
    handlers.load(page, "ann1")
    out = handlers.submit(page, "ann2", "p0", "tok", "A > B > C > D", False, "")
    assert "not assigned to you" in out["message"] and stored(store) == []


def test_all_bad_with_an_empty_ranking_ties_everything(page, store):
    item = handlers.load(page, "ann1")
    out = handlers.submit(page, "ann1", item["prompt-id"], "tok", "", True, "none helps")
    assert out["message"] == "Saved your ranking of p0: A = B = C = D."
    assert store.submitted_rankings()[0]["flags"] == ["all_bad"]


def test_skip_moves_on_and_is_never_offered_again(page, store):
    item = handlers.load(page, "ann1")
    out = handlers.skip(page, "ann1", item["prompt-id"], item["client-token"], "")
    assert out["message"] == "Skipped p0." and out["prompt-id"] == "p1"
    assert "1 skipped" in out["progress"] and stored(store) == []
    assert handlers.history(page, "ann1")["history"][0][:2] == ["p0", "skipped"]
    again = handlers.skip(page, "ann1", "p0", "other-token", "")
    assert set(again) == {"message", "progress"} and "already skipped" in again["message"]
    assert handlers.skip(page, "ann1", "", "", "")["prompt-id"] == "p1"  # no item shown: Next


def board(ranking: str, labels: str = "ABCD") -> str:
    return json.dumps({"labels": list(labels), "ranking": ranking})


def test_draft_is_saved_as_you_go_and_restored_on_load(page, store):
    item = handlers.load(page, "ann1")
    pid, labels = item["prompt-id"], item["labels"]
    # an earlier error message is cleared
    out = handlers.ranking_text_changed(page, "ann1", pid, labels, "C > A = D", False, "", "", "Error: old")
    assert out == {"board": board("C > A = D"), "message": ""}
    # text -> board, in canonical form; other messages are kept
    out = handlers.ranking_text_changed(page, "ann1", pid, labels, "c > a", False, "", "", "Saved ...")
    assert out == {"board": board("C > A")}
    half = handlers.ranking_text_changed(page, "ann1", pid, labels, "c > x", False, "", "", "")
    assert set(half) == {"message"} and half["message"].startswith("Error: ")  # board untouched
    assert handlers.extras_changed(page, "ann1", pid, "c > a", True, "hard one", "", "") == {}
    reopened = handlers.load(page, "ann1")
    assert reopened["prompt-id"] == pid and reopened["message"] == "Draft restored."
    assert (reopened["ranking"], reopened["all-bad"], reopened["comment"]) == ("c > a", True, "hard one")
    assert reopened["board"] == board("C > A")
    assert stored(store) == []  # a draft is not a submission


def test_a_board_change_keeps_the_draft_and_a_malformed_value_ranks_nothing(page, store):
    item = handlers.load(page, "ann1")
    pid = item["prompt-id"]
    assert handlers.board_changed(page, "ann1", pid, board("C > A = D"), False, "", "", "Error: old") == {
        "message": ""
    }
    assert handlers.load(page, "ann1")["ranking"] == "C > A = D"
    for junk in ("", "not json", "[1, 2]", '{"ranking": 5}'):
        assert handlers.board_changed(page, "ann1", pid, junk, False, "", "", "") == {}
        assert handlers.load(page, "ann1")["ranking"] == ""
    handlers.submit(page, "ann1", pid, "tok", "A > B > C > D", False, "")
    assert handlers.board_changed(page, "ann1", pid, board("D > C > B > A"), False, "", "", "") == {}  # stale
    assert stored(store) == [("p0", "ann1", "A > B > C > D")]


def test_the_best_response_can_be_edited_and_the_edit_is_stored_with_the_ranking(page, store):
    item = handlers.load(page, "ann1")
    pid, labels = item["prompt-id"], item["labels"]
    tie = handlers.start_edit(page, "ann1", pid, labels, "A = B > C > D")
    assert "tie" in tie["message"] and "edit" not in tie
    assert "rank the responses first" in handlers.start_edit(page, "ann1", pid, labels, "")["message"]
    out = handlers.start_edit(page, "ann1", pid, labels, "c > a > b > d")
    assert out["edit"] == "answer C0" and out["message"].startswith("Editing response C")
    assert "no response E" in handlers.start_edit(page, "ann1", pid, "A B C D E", "E > A")["message"]
    assert "not assigned to you" in handlers.start_edit(page, "ann2", pid, labels, "C > A")["message"]
    # the edit is kept with the draft, restored on load, and stored with the submission
    handlers.extras_changed(page, "ann1", pid, "c > a > b > d", False, "", "answer C0, fixed", "")
    assert handlers.load(page, "ann1")["edit"] == "answer C0, fixed"
    handlers.submit(page, "ann1", pid, "tok", "C > A > B > D", False, "", "answer C0, fixed")
    [row] = store.submitted_rankings()
    assert (row["edit"], row["edit_of"]) == ("answer C0, fixed", "C")
    # a revision that keeps C first keeps the edit; one that puts another response first drops it
    token = handlers.open_submission(page, "ann1", pid)["history-token"]
    kept = handlers.revise(page, "ann1", pid, "C > B > A > D", False, "", token)
    assert kept["history-message"] == f"Revised {pid}: C > B > A > D (revision 1)."
    assert store.submitted_rankings()[0]["edit"] == "answer C0, fixed"
    dropped = handlers.revise(page, "ann1", pid, "B > C > A > D", False, "", token + "x")
    assert dropped["history-message"].endswith("Your edit of response C was dropped: it is no longer first.")
    assert "edit" not in store.submitted_rankings()[0]


def test_a_conversation_prompt_is_shown_as_a_transcript():
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\u202e there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    view = handlers.conversation_view(turns)
    assert view["visible"] is True and view["label"] == "Conversation so far (system: Be brief.)"
    assert [t["role"] for t in view["value"]] == ["user", "assistant", "user"]
    assert view["value"][0]["content"] == "Hi⟦U+202E⟧ there"  # invisible tricks made visible
    assert handlers.conversation_view(None) == Props(visible=False, value=[])


def test_a_conversation_item_carries_its_turns(page, store):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital?"},
    ]
    store.upsert_project("chat", quorum=1)
    store.add_items(
        [
            {
                "prompt_id": "chat",
                "prompt": turns,
                "candidates": [{"label": "A", "text": "Paris"}, {"label": "B", "text": "Lyon"}],
            }
        ],
        "chat",
    )
    out = handlers.load(Page.for_store(store, "chat"), "ann1")
    assert out["prompt-id"] == "chat" and out["conversation"]["value"] == turns
    assert out["prompt"]["visible"] is False  # the transcript replaces the flattened text


def test_a_draft_event_after_the_submit_leaves_the_page_alone(page, store):
    item = handlers.load(page, "ann1")
    pid, labels = item["prompt-id"], item["labels"]
    handlers.submit(page, "ann1", pid, "tok", "A > B > C > D", False, "")
    assert handlers.ranking_text_changed(page, "ann1", pid, labels, "D > C > B > A", False, "", "", "") == {}
    assert stored(store) == [("p0", "ann1", "A > B > C > D")]


def test_history_open_and_revise(page, store):
    item = handlers.load(page, "ann1")
    handlers.submit(page, "ann1", item["prompt-id"], "tok", "A = B > D > C", False, "")
    opened = handlers.open_submission(page, "ann1", "p0")
    assert opened["history-ranking"] == "A = B > D > C" and opened["history-message"] == ""
    assert (
        opened["history-item"].startswith("Prompt p0:\nprompt 0")
        and "Response D:\nanswer D0" in opened["history-item"]
    )
    bad = handlers.revise(page, "ann1", "p0", "A > Z", False, "", opened["history-token"])
    assert bad["history-message"].startswith("Error: ") and "history-prompt" not in bad
    assert stored(store) == [("p0", "ann1", "A = B > D > C")]
    out = handlers.revise(page, "ann1", "p0", "d > c > a = b", False, "", opened["history-token"])
    assert out["history-message"] == "Revised p0: D > C > A = B (revision 1)."
    assert out["history"][0][2] == "D > C > A = B" and out["history"][0][4] == 1
    assert stored(store) == [("p0", "ann1", "D > C > A = B")]


def test_another_annotators_submission_cannot_be_opened_or_revised(page, store):
    item = handlers.load(page, "ann1")
    handlers.submit(page, "ann1", item["prompt-id"], "tok", "A > B > C > D", False, "")
    opened = handlers.open_submission(page, "ann2", "p0")
    assert "no submitted ranking" in opened["history-message"] and opened["history-item"] == ""
    out = handlers.revise(page, "ann2", "p0", "D > C > B > A", False, "", "t")
    assert "no submitted ranking" in out["history-message"]
    assert stored(store) == [("p0", "ann1", "A > B > C > D")]


def test_admin_statistics_and_export_are_refused_for_an_annotator(page, store, tmp_path, monkeypatch):
    item = handlers.load(page, "ann1")
    handlers.submit(page, "ann1", item["prompt-id"], "tok", "C > A = B > D", False, "")
    refused = handlers.admin_export(page, "ann1", "rankings")
    assert refused == {"admin-download": "", "admin-message": "Error: this needs an admin account"}
    stats = handlers.admin_statistics(page, "ann1")
    assert stats["admin-message"] == "Error: this needs an admin account" and stats["admin-headline"] is None

    stats = handlers.admin_statistics(page, "boss")
    headline = {row[0]: row[1:] for row in stats["admin-headline"].rows}
    assert headline["rankings done / needed"] == ["1 / 6 (17 %)", ""]
    assert isinstance(stats["admin-annotators"], Table) and stats["admin-annotators"].rows[0][:3] == [
        "ann1",
        1,
        0,
    ]
    assert stats["admin-throughput"].rows == [["ann1", 1], ["ann2", 0], ["boss", 0]]
    assert stats["admin-progress"].rows[0][1] == 1 and len(stats["admin-progress"].rows) == 1
    out = handlers.admin_export(page, "boss", "pairs")
    assert out["admin-message"] == "Exported 6 pairs records."  # 4 responses: 6 pairs, one of them a tie
    [link] = re.findall(r"\]\((export/[^)]+)\)", out["admin-download"])
    _, token, name = link.split("/")
    lines = exports.REGISTRY.find(token, "boss", name).read_text().splitlines()
    assert len(lines) == 6 and sum(json.loads(x)["tie"] for x in lines) == 1


def test_hand_made_label_values_are_ignored_not_crashed_on(page):
    item = handlers.load(page, "ann1")
    for junk in (None, "2", "A 7 <b>", ""):
        out = handlers.ranking_text_changed(page, "ann1", item["prompt-id"], junk, "A > B", False, "", "", "")
        assert set(out) <= {"board", "message"}
        assert "message" in handlers.start_edit(page, "ann1", item["prompt-id"], junk, "A > B")
        assert (
            not any(p["visible"] for p in handlers.rendered_views(page, True, junk).values())
            or junk == "A 7 <b>"
        )


def test_rendered_views_follow_the_toggle_and_the_item(page):
    assert handlers.rendered_views(page, True, "A B") == {
        "rendered-A": Props(visible=True),
        "rendered-B": Props(visible=True),
        "rendered-C": Props(visible=False),
        "rendered-D": Props(visible=False),
    }
    assert not any(p["visible"] for p in handlers.rendered_views(page, False, "A B C D").values())


def test_all_done_and_too_many_responses_for_the_page(store):
    small = Page(store, slots=("A", "B"))  # a page started before 4-response prompts were imported
    out = handlers.load(small, "ann1")
    assert (
        out["prompt-id"] == "" and "has 4 responses but this page was started with 2 slots" in out["message"]
    )
    assert out["slot-A"] == Props(visible=False) and json.loads(out["board"])["labels"] == []
    done = handlers.item_view(Page.for_store(store), "ann1", None, "")
    assert done["prompt"]["value"].startswith("All done") and done["labels"] == ""


def test_the_api_handlers(page, store):
    item = handlers.api_next(page, "ann1")
    assert item["ok"] and item["prompt_id"] == "p0" and item["responses"]["B"] == "answer B0"
    res = handlers.api_submit(page, "ann1", "p0", "b > a = c > d", [], "", "tok-1")
    assert res.pop("server_ms") >= 0 and res["ranking"] == "B > A = C > D" and res["duplicate"] is False
    again = handlers.api_submit(page, "ann1", "p0", "b > a = c > d", [], "", "tok-1")
    assert again["duplicate"] is True
    bad = handlers.api_submit(page, "ann1", "p1", "A > B > C > D", ["gold"], "", "tok-2")
    assert bad == {"ok": False, "code": "bad_flag", "message": bad["message"]}
    assert handlers.api_skip(page, "ann2", "p0", "")["code"] == "not_assigned"
    for _ in range(3):
        pid = handlers.api_next(page, "ann1")["prompt_id"]
        if pid is not None:
            assert handlers.api_skip(page, "ann1", pid, "")["status"] == "skipped"
    assert handlers.api_next(page, "ann1") == {
        "ok": True,
        "prompt_id": None,
        "message": "nothing left to rank",
    }


def test_the_api_submits_an_edit_of_the_best_response(page, store):
    pid = handlers.api_next(page, "ann1")["prompt_id"]
    tied = handlers.api_submit(page, "ann1", pid, "A = B > C > D", [], "", "tok-1", "a better A")
    assert tied["ok"] is False and tied["code"] == "edit_needs_single_best"
    res = handlers.api_submit(page, "ann1", pid, "C > A > B > D", [], "", "tok-2", "answer C0, fixed")
    assert res["ok"] is True and res["status"] == "submitted"
    row = store.submitted_rankings()[0]
    assert (row["edit"], row["edit_of"]) == ("answer C0, fixed", "C")
    # no edit (None from a client that leaves it out, or blank) stores none
    pid = handlers.api_next(page, "ann1")["prompt_id"]
    assert handlers.api_submit(page, "ann1", pid, "A > B > C > D", [], "", "tok-3", None)["ok"] is True
    pid = handlers.api_next(page, "ann1")["prompt_id"]
    assert handlers.api_submit(page, "ann1", pid, "A > B > C > D", [], "", "tok-4", "  ")["ok"] is True
    assert [("edit" in r) for r in store.submitted_rankings()] == [True, False, False]


def test_importing_the_app_leaves_the_environment_alone(tmp_path):
    pytest.importorskip("gradio")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_ANALYTICS")}
    code = (
        "import os, annotation_app.app, annotation_app.server; "
        "print(sorted(k for k in os.environ if k.startswith('GRADIO_ANALYTICS')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_import_paths_still_work():
    from annotation_app.store import (  # noqa: F401
        DEFAULT_LEASE_SECONDS,
        FLAGS,
        MIGRATIONS,
        ROLES,
        SCHEMA_VERSION,
        Item,
        LoginThrottle,
        StoreError,
        SubmitResult,
        check_flags,
        hash_password,
        parse_for_submit,
    )

    pytest.importorskip("gradio")
    from annotation_app.app import BodySizeLimit, build_app, launch, make_auth, serve, serve_candidates  # noqa: F401


def test_the_admin_export_links_the_annotators_reliability_when_rankings_overlap(page, store):
    for user in ("ann1", "ann2"):  # both rank all three prompts
        for i in range(3):
            item = handlers.load(page, user)
            handlers.submit(page, user, item["prompt-id"], f"tok-{user}-{i}", "A > B > C > D", False, "")
    out = handlers.admin_export(page, "boss", "rankings")
    names = [link.split("/")[-1] for link in re.findall(r"\]\((export/[^)]+)\)", out["admin-download"])]
    assert names == ["rankings.jsonl", "rankings.annotators.json"]
