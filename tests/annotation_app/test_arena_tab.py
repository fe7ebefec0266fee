"""The Arena tab's handlers called directly on a real store (SQLite and PostgreSQL): votes stored as
rankings of the pair, skips, nothing left, blindness, and the admins' leaderboard and export."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from annotation_app import arena_tab, exports
from annotation_app.app import build_app
from annotation_app.handlers import Page, Props, Table
from annotation_app.handlers import next_item as ranking_next_item
from annotation_app.store import Store
from rlhf.arena import arena_pairs, fit_leaderboard, votes_from_rankings
from rlhf.contracts import load_rankings

MODELS = ("policy-sft-7f3", "policy-ppo-9c1", "policy-dpo-2e8")
N_BOOT = 200  # enough for the intervals to be intervals, quick on a shared machine


def arena_records(n_prompts: int = 3) -> list[dict]:
    """Every pair of MODELS' answers to each prompt (3 pairs a prompt), as `rlhf arena run` writes them."""
    responses = [
        {
            "prompt_id": f"q{i}",
            "prompt": f"Question {i}: <b>why?</b>",
            "responses": {
                m: {"text": f"answer {i} by model {k}" + "!" * k, "n_tokens": 5, "finished": True}
                for k, m in enumerate(MODELS)
            },
        }
        for i in range(n_prompts)
    ]
    return arena_pairs(responses, seed=0)


@pytest.fixture()
def store(db):
    s = Store(db)
    s.migrate()
    s.upsert_project("default", quorum=2)
    s.add_items(
        [
            {"prompt_id": "r0", "prompt": "rank me", "candidates": [{"label": x, "text": x} for x in "ABCD"]},
        ]
    )
    s.upsert_project("arena", quorum=2, guidelines="Vote for the **better** answer.", kind="arena")
    s.add_items(arena_records(), project_id="arena")
    s.add_user("ann1", "password-ann1")
    s.add_user("ann2", "password-ann2")
    s.add_user("boss", "password-boss", "admin")
    yield s
    s.close()


@pytest.fixture()
def page(store):
    return Page.for_store(store)


def votes_of(store: Store, user: str) -> dict[str, str]:
    return {
        r["prompt_id"]: r["ranking"] for r in store.submitted_rankings(kind="arena") if r["annotator"] == user
    }


def vote_on_every_pair(page: Page, user: str, buttons: list[str]) -> list[dict]:
    """``user`` votes on pairs in turn, pressing ``buttons`` (cycled) until none is left."""
    out, view = [], arena_tab.open_arena(page, user)
    while view["arena-prompt-id"]:
        view = arena_tab.vote(
            page, user, view["arena-prompt-id"], view["arena-token"], buttons[len(out) % len(buttons)]
        )
        out.append(view)
    return out


def test_opening_the_tab_shows_a_pair_as_literal_text_and_the_leaderboard_to_admins_only(page):
    view = arena_tab.open_arena(page, "ann1")
    pid = view["arena-prompt-id"]
    assert pid == "q0-p1" and len(view["arena-token"]) == 32
    assert view["arena-prompt"] == Props(visible=True, value="Question 0: <b>why?</b>")
    assert view["arena-response-A"].startswith("answer 0") and view["arena-response-B"].startswith("answer 0")
    assert view["arena-guidelines"] == "Vote for the **better** answer."
    assert view["arena-progress"] == "ann1: 0 voted" and view["arena-message"] == ""
    assert all(view[key] == Props(interactive=True) for key in [*arena_tab.CHOICES, "arena-skip"])
    assert view["arena-admin"] == Props(visible=False)
    assert arena_tab.open_arena(page, "boss")["arena-admin"] == Props(visible=True)
    assert ranking_next_item(page, "ann1")["prompt-id"] == "r0"  # the ranking tab never serves a pair


def test_each_button_stores_its_ranking_of_the_pair_and_the_next_pair_appears(page, store):
    first = arena_tab.open_arena(page, "ann1")
    shown = []
    view = first
    for button in ("arena-a", "arena-tie", "arena-b"):
        shown.append(view["arena-prompt-id"])
        view = arena_tab.vote(page, "ann1", view["arena-prompt-id"], view["arena-token"], button)
    assert votes_of(store, "ann1") == dict(zip(shown, ["A > B", "A = B", "B > A"]))
    assert view["arena-message"] == f"Saved your vote on {shown[-1]}: B is better."
    assert view["arena-progress"] == "ann1: 3 voted"
    assert view["arena-prompt-id"] not in shown and view["arena-token"] != first["arena-token"]


def test_a_second_click_with_the_same_token_stores_nothing_more(page, store):
    view = arena_tab.open_arena(page, "ann1")
    pid, token = view["arena-prompt-id"], view["arena-token"]
    arena_tab.vote(page, "ann1", pid, token, "arena-a")
    again = arena_tab.vote(page, "ann1", pid, token, "arena-b")  # a double press: the first vote stands
    assert again["arena-message"] == f"Saved your vote on {pid}: A is better."
    assert votes_of(store, "ann1") == {pid: "A > B"}
    refused = arena_tab.vote(page, "ann1", pid, "another-token", "arena-b")
    assert (
        set(refused) == {"arena-progress", "arena-message"}
        and "already submitted" in refused["arena-message"]
    )
    assert refused["arena-message"].startswith("Error: ") and votes_of(store, "ann1") == {pid: "A > B"}


def test_skip_moves_on_and_the_pair_is_not_offered_again(page, store):
    view = arena_tab.open_arena(page, "ann1")
    pid = view["arena-prompt-id"]
    out = arena_tab.skip(page, "ann1", pid, view["arena-token"])
    assert out["arena-message"] == f"Skipped {pid}." and out["arena-prompt-id"] != pid
    assert votes_of(store, "ann1") == {} and out["arena-progress"] == "ann1: 0 voted"
    again = arena_tab.skip(page, "ann1", pid, "other-token")
    assert "already skipped" in again["arena-message"]
    offered = [v["arena-prompt-id"] for v in vote_on_every_pair(page, "ann1", ["arena-a"])]
    assert pid not in offered


def test_when_nothing_is_left_the_page_says_so_and_voting_is_off(page, store):
    views = vote_on_every_pair(page, "ann1", ["arena-a", "arena-b", "arena-tie"])
    done = views[-1]
    assert len(votes_of(store, "ann1")) == 9 and done["arena-prompt-id"] == ""
    assert done["arena-prompt"] == Props(visible=True, value=arena_tab.ALL_VOTED)
    assert done["arena-progress"] == "ann1: 9 voted"
    assert all(done[key] == Props(interactive=False) for key in [*arena_tab.CHOICES, "arena-skip"])
    # A vote sent without a pair (a stale page) just shows where things stand.
    assert arena_tab.vote(page, "ann1", "", "", "arena-a")["arena-prompt"] == done["arena-prompt"]
    assert arena_tab.next_pair(page, "ann1")["arena-prompt-id"] == ""


def test_without_an_arena_project_the_page_says_there_is_none(tmp_path):
    store = Store(tmp_path / "plain.db")
    store.upsert_project("default", quorum=1)
    store.add_items([{"prompt_id": "r0", "prompt": "p", "candidates": [{"label": "A", "text": "a"}]}])
    store.add_user("ann1", "password-ann1")
    view = arena_tab.open_arena(Page.for_store(store), "ann1")
    assert view["arena-prompt"] == Props(visible=True, value=arena_tab.NO_ARENA)
    assert "rlhf arena import" in arena_tab.NO_ARENA
    store.close()


def test_an_item_that_is_not_a_pair_can_only_be_skipped(store):
    store.upsert_project("odd", quorum=1, kind="arena")
    store.add_items(
        [{"prompt_id": "x0", "prompt": "p", "candidates": [{"label": x, "text": x} for x in "ABC"]}], "odd"
    )
    page = Page.for_store(store, project="odd")
    view = arena_tab.open_arena(page, "ann1")
    assert view["arena-prompt-id"] == "x0" and view["arena-skip"] == Props(interactive=True)
    assert all(view[key] == Props(interactive=False) for key in arena_tab.CHOICES)
    assert view["arena-message"] == (
        "Error: x0 has responses A, B, C, but an arena pair has exactly A and B; skip it and tell your admin."
    )
    assert arena_tab.skip(page, "ann1", "x0", view["arena-token"])["arena-prompt"] == Props(
        visible=True, value=arena_tab.ALL_VOTED
    )


def test_no_model_name_reaches_an_annotator(page, store):
    """Blindness: the page as built (its config, which the browser receives) and every answer of
    the voting handlers, for an annotator and for an admin voting, name no model."""
    answers = [build_app(store).get_config_file()]
    for user in ("ann1", "boss"):
        view = arena_tab.open_arena(page, user)
        answers += [view, arena_tab.next_pair(page, user)]
        answers.append(view := arena_tab.skip(page, user, view["arena-prompt-id"], view["arena-token"]))
        answers += vote_on_every_pair(page, user, ["arena-a", "arena-tie", "arena-b"])
    answers += [arena_tab.leaderboard(page, "ann1", "", n_boot=0), arena_tab.export_votes(page, "ann1")]
    text = json.dumps(answers, default=repr)
    assert "answer 1 by model" in text  # the responses are there ...
    assert not [m for m in MODELS if m in text]  # ... their models are not
    assert len(votes_of(store, "ann1")) == 8


def test_the_leaderboard_is_the_fit_of_the_stored_votes(page, store):
    vote_on_every_pair(page, "ann1", ["arena-a", "arena-b", "arena-a", "arena-tie"])
    vote_on_every_pair(page, "ann2", ["arena-b", "arena-a", "arena-tie"])
    votes = votes_from_rankings(store.submitted_rankings(kind="arena"))
    for baseline in ("", MODELS[1]):
        out = arena_tab.leaderboard(page, "boss", baseline, n_boot=N_BOOT)
        board = fit_leaderboard(votes, "human", baseline or None, n_boot=N_BOOT, seed=0)
        table = out["arena-leaderboard"]
        assert table.columns == [
            "model",
            "rating [95% CI]",
            f"win rate vs {board.baseline}",
            f"length-controlled win rate vs {board.baseline} [95% CI]",
            "votes",
        ]
        expected = []
        for r in board.rows():
            on_model = sum(r["model"] in (v.model_a, v.model_b) for v in votes)
            if r["model"] == board.baseline:
                win, lc = "—", "—"
            else:
                win = f"{r['win_rate']:.3f}"
                lc = f"{r['lc_win_rate']:.3f} [{r['lc_low']:.3f}, {r['lc_high']:.3f}]"
                lc += " (extrapolated)" if r["lc_extrapolated"] else ""  # lengths barely overlapped
            rating = f"{r['rating']:.0f} [{r['ci_low']:.0f}, {r['ci_high']:.0f}]"
            expected.append([r["model"], rating, win, lc, on_model])
        assert table.rows == expected and sorted(row[0] for row in table.rows) == sorted(MODELS)
        assert all(r["ci_low"] < r["rating"] < r["ci_high"] for r in board.rows())  # real intervals
        assert isinstance(out["arena-figure"], Figure)
        plt.close(out["arena-figure"])
        assert out["arena-baseline"] == Props(
            choices=[arena_tab.LOWEST_RATED, *((m, m) for m in sorted(MODELS))], value=baseline
        )
        assert out["arena-admin-message"].startswith(f"{len(votes)} votes on 3 prompts, ties ")
        assert f"win rates against {board.baseline}." in out["arena-admin-message"]


def test_votes_that_cannot_rate_the_models_get_a_one_line_reason(page, store):
    out = arena_tab.leaderboard(page, "boss", "", n_boot=0)
    assert out["arena-admin-message"] == (
        "Error: no arena votes yet: the leaderboard appears once annotators have voted"
    )
    assert (
        out["arena-leaderboard"] == Table(arena_tab.leaderboard_columns(None)) and out["arena-figure"] is None
    )
    vote_on_every_pair(page, "ann1", ["arena-tie"])  # only ties: nothing tells the models apart
    out = arena_tab.leaderboard(page, "boss", "", n_boot=0)
    assert out["arena-admin-message"].startswith("Error: human: the votes cannot rate the models")
    assert out["arena-leaderboard"].rows == [] and out["arena-figure"] is None


def test_annotators_get_neither_the_leaderboard_nor_the_votes(page, store):
    vote_on_every_pair(page, "ann1", ["arena-a", "arena-b"])
    out = arena_tab.leaderboard(page, "ann1", "", n_boot=0)
    assert out["arena-admin-message"] == "Error: this needs an admin account"
    assert out["arena-leaderboard"].rows == [] and out["arena-figure"] is None and "arena-baseline" not in out
    out = arena_tab.export_votes(page, "ann1")
    assert out == {"arena-download": "", "arena-admin-message": "Error: this needs an admin account"}


def test_admins_download_the_votes_as_preference_data(page, store, tmp_path, monkeypatch):
    monkeypatch.setattr(exports, "REGISTRY", exports.ExportRegistry())
    assert arena_tab.export_votes(page, "boss")["arena-admin-message"] == (
        "Error: there are no arena votes to export yet"
    )
    vote_on_every_pair(page, "ann1", ["arena-a", "arena-b", "arena-tie"])
    out = arena_tab.export_votes(page, "boss")
    assert out["arena-admin-message"] == "Exported 9 arena votes."
    [(name, token)] = [
        (link.split("/")[-1].rstrip(")"), link.split("/")[-2])
        for link in out["arena-download"].split()
        if "(export/" in link
    ]
    path = exports.REGISTRY.find(token, "boss", name)
    assert name == "arena_votes.jsonl" and path is not None
    records = load_rankings(str(path))  # the rankings contract: preference data as it is
    assert {r["ranking"] for r in records} == {"A > B", "B > A", "A = B"} and len(records) == 9
    assert all(r["voter"] == "human" and r["annotator"] == "ann1" for r in records)
    assert all({c["model"] for c in r["candidates"]} <= set(MODELS) for r in records)
    assert len(votes_from_rankings(records)) == 9
    exports.REGISTRY.close()
