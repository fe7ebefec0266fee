"""The Arena tab in a real browser (Playwright + Debian's chromium): blind votes by keyboard and by
mouse, read back from the database; the admins' leaderboard; a screenshot for a reviewer."""

from __future__ import annotations

import json

import pytest

from annotation_app.store import Store
from rlhf.arena import arena_pairs, votes_from_rankings
from rlhf.cli import main
from tests.annotation_app import test_browser
from tests.annotation_app.test_browser import (
    CHROMIUM,
    SCREENSHOTS,
    TIMEOUT,
    free_port,
    in_viewport,
    log_in_with_keyboard,
    value,
    wait_value,
)

pytestmark = pytest.mark.browser
browser = test_browser.browser  # the chromium fixture, shared (module scope: one per file)

MODELS = ("policy-sft-7f3", "policy-ppo-9c1", "policy-dpo-2e8")
USERS = ("alice", "bob", "carol", "dave")
WORDS = {"A > B": "A is better", "A = B": "Tie", "B > A": "B is better"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make chromium` or apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    from annotation_app.server import launch

    folder = tmp_path_factory.mktemp("arena")
    db = folder / "lab.db"
    store = Store(db)
    store.upsert_project("default", quorum=1)  # a ranking project too: the two tabs keep apart
    store.add_items(
        [
            {
                "prompt_id": f"r{i}",
                "prompt": f"prompt {i}",
                "prompt_text": f"Prompt number {i}",
                "candidates": [{"label": lab, "text": f"ranked answer {lab}{i}"} for lab in "ABCD"],
            }
            for i in range(8)  # every login leases one: enough for every user
        ]
    )
    responses = [
        {
            "prompt_id": f"q{i}",
            "prompt": f"Question {i}: which is kinder?",
            "responses": {
                m: {"text": f"Answer {i} number {k}.\n" * (3 + 4 * k), "n_tokens": 9, "finished": True}
                for k, m in enumerate(MODELS)
            },
        }
        for i in range(4)
    ]
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in arena_pairs(responses, seed=0)))
    # The real path in: `rlhf arena import` (12 pairs, 3 votes wanted on each).
    assert main(["arena", "import", "--pairs", str(pairs), "--db", str(db), "--quorum", "3"]) == 0
    for user in USERS:
        store.add_user(user, f"password-{user}")
    store.add_user("root", "password-root", "admin")
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    yield {"url": url, "store": store}
    demo.close()
    store.close()


def open_arena(page, *, keyboard: bool) -> str:
    """Select the Arena tab (by keyboard: focus the tab, Enter) and wait for a pair; its id."""
    tab = page.get_by_role("tab", name="Arena")
    if keyboard:
        tab.focus()
        page.keyboard.press("Enter")
    else:
        tab.click()
    wait_value(page, "arena-prompt", "Question")
    page.wait_for_selector("#arena-a:not([disabled])", timeout=TIMEOUT)
    return value(page, "arena-prompt-id")


def vote_and_wait(page, pid: str, press) -> str:
    """Vote on pair ``pid`` (``press()`` presses a key or clicks), wait for the next; its id."""
    press()
    wait_value(page, "arena-message", pid)
    page.wait_for_function(
        "(pid) => { const e = document.querySelector('#arena-prompt-id textarea, #arena-prompt-id input');"
        " return e && e.value && e.value !== pid; }",
        arg=pid,
        timeout=TIMEOUT,
    )
    return value(page, "arena-prompt-id")


def stored_votes(store: Store, user: str) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in store.submitted_rankings(kind="arena") if r["annotator"] == user}


def winner(record: dict) -> str | None:
    """The model that won a stored vote (None: a tie), from the stored candidates' models."""
    [vote] = votes_from_rankings([record])
    return {"a": vote.model_a, "b": vote.model_b, "tie": None}[vote.outcome]


def assert_blind(page) -> None:
    """No model name in the page: its HTML (the embedded config too), its text, every field's value."""
    values = page.eval_on_selector_all("textarea, input", "es => es.map(e => e.value)")
    seen = page.content() + page.inner_text("body") + "\n".join(values)
    assert "Question" in seen
    assert not [m for m in MODELS if m in seen]


def test_keyboard_only_votes_a_tie_and_b_then_the_database_has_the_winners(app, browser):
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"], "alice")
    pid = open_arena(page, keyboard=True)
    assert value(page, "arena-progress") == "alice: 0 voted"
    expected = {}
    for key, ranking in (("a", "A > B"), ("t", "A = B"), ("b", "B > A")):
        shown = {label: value(page, f"arena-response-{label}") for label in "AB"}
        nxt = vote_and_wait(page, pid, lambda key=key: page.keyboard.press(key))
        assert value(page, "arena-message") == f"Saved your vote on {pid}: {WORDS[ranking]}."
        expected[pid] = (ranking, shown)
        pid = nxt
    wait_value(page, "arena-progress", "alice: 3 voted")
    # The other keys: S skips, 2 and = tie, 1 and 3 vote; nothing is voted while a modifier is held.
    page.keyboard.press("Alt+a")
    page.keyboard.press("Control+b")
    page.wait_for_timeout(300)
    assert value(page, "arena-prompt-id") == pid
    skipped, pid = pid, vote_and_wait(page, pid, lambda: page.keyboard.press("s"))
    assert value(page, "arena-message") == f"Skipped {skipped}."
    for key, ranking in (("2", "A = B"), ("=", "A = B"), ("1", "A > B"), ("3", "B > A")):
        shown = {label: value(page, f"arena-response-{label}") for label in "AB"}
        expected[pid] = (ranking, shown)
        pid = vote_and_wait(page, pid, lambda key=key: page.keyboard.press(key))
    assert_blind(page)
    # Back on the ranking tab the arena's keys do nothing (its buttons are hidden).
    page.get_by_role("tab", name="Annotate").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#arena-a", state="hidden", timeout=TIMEOUT)
    page.keyboard.press("b")
    page.keyboard.press("s")
    page.wait_for_timeout(500)
    assert pid not in {h["prompt_id"] for h in app["store"].history("alice")}  # neither voted nor skipped

    votes = stored_votes(app["store"], "alice")
    assert {p: v["ranking"] for p, v in votes.items()} == {p: r for p, (r, _) in expected.items()}
    assert skipped not in votes
    for pid, (ranking, shown) in expected.items():
        record = votes[pid]
        by_label = {c["label"]: c for c in record["candidates"]}
        assert {label: by_label[label]["text"] for label in "AB"} == shown  # the texts voted on
        want = {"A > B": by_label["A"]["model"], "B > A": by_label["B"]["model"], "A = B": None}[ranking]
        assert winner(record) == want and {c["model"] for c in record["candidates"]} <= set(MODELS)
    page.close()


def test_mouse_only_votes_and_skip(app, browser):
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"], "bob")
    pid = open_arena(page, keyboard=False)
    clicked = {}
    for button, ranking in (("#arena-b", "B > A"), ("#arena-tie", "A = B"), ("#arena-a", "A > B")):
        clicked[pid] = ranking
        pid = vote_and_wait(page, pid, lambda button=button: page.locator(button).click())
    skipped, pid = pid, vote_and_wait(page, pid, lambda: page.locator("#arena-skip").click())
    assert value(page, "arena-message") == f"Skipped {skipped}."
    wait_value(page, "arena-progress", "bob: 3 voted")
    assert_blind(page)
    votes = stored_votes(app["store"], "bob")
    assert {p: v["ranking"] for p, v in votes.items()} == clicked
    page.close()


def test_the_screen_fits_1366x768_with_its_buttons_in_view(app, browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"], "dave")
    open_arena(page, keyboard=False)
    for selector in ("#arena-a", "#arena-tie", "#arena-b", "#arena-skip", "#arena-progress", "#arena-prompt"):
        assert in_viewport(page, selector), f"{selector} is off screen at 1366x768"
    assert not page.locator("#arena-admin").is_visible()  # not an admin
    assert_blind(page)
    page.screenshot(path=str(SCREENSHOTS / "arena_1366x768.png"))
    page.close()


def test_an_admin_sees_the_leaderboard_with_intervals_and_downloads_the_votes(app, browser):
    store = app["store"]
    for n in range(12):  # carol votes on every pair through the store, as the tab does
        item = store.next_item("carol", kind="arena")
        if item is None:
            break
        store.submit("carol", item.prompt_id, ("A > B", "B > A", "A > B", "A = B")[n % 4])
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"], "root")
    open_arena(page, keyboard=False)
    page.wait_for_selector("#arena-admin", state="visible", timeout=TIMEOUT)
    page.locator("#arena-refresh").click()
    wait_value(page, "arena-admin-message", "votes on 4 prompts")
    table = page.inner_text("#arena-leaderboard")
    for model in MODELS:
        assert model in table
    assert "rating [95% CI]" in table and table.count("[") >= 3 + 2  # a rating interval per model, LC ones
    page.wait_for_selector("#arena-figure img", timeout=TIMEOUT)
    # Another baseline: the win rates are measured against it. It must differ from the default (the
    # lowest rated), or the waits below would pass on the old table while the new one is computed,
    # and that event would then overwrite the export's message.
    default = value(page, "arena-admin-message")
    baseline = next(m for m in MODELS if not default.endswith(f"win rates against {m}."))
    page.locator("#arena-baseline input").click()
    page.get_by_role("option", name=baseline).click()
    wait_value(page, "arena-admin-message", f"win rates against {baseline}.")
    page.wait_for_function(
        "(m) => document.querySelector('#arena-leaderboard').innerText.includes('win rate vs ' + m)",
        arg=baseline,
        timeout=TIMEOUT,
    )
    page.locator("#arena-export").click()
    wait_value(page, "arena-admin-message", "Exported")
    link = page.locator("#arena-download a").first
    with page.expect_download(timeout=TIMEOUT) as download:
        link.click()
    records = [json.loads(line) for line in open(download.value.path(), encoding="utf-8")]
    assert records and all(len(r["candidates"]) == 2 and r["voter"] == "human" for r in records)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # Gradio marks an output pending while its event runs: shoot once everything has been drawn
    page.wait_for_function("() => !document.querySelector('.pending, .progress-text')", timeout=TIMEOUT)
    page.screenshot(path=str(SCREENSHOTS / "arena_leaderboard_1366x768.png"), full_page=True)
    page.close()
