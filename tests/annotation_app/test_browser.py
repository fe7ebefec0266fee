"""Real-browser tests: Playwright driving Debian's chromium against the running app."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from annotation_app.io import export_rankings
from annotation_app.store import Store

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
TIMEOUT = 60_000  # ms; generous: the test machine is shared and often saturated
# Where the screenshot test leaves its pictures for a reviewer (kept after the run).
SCREENSHOTS = Path(
    os.environ.get("RLHF_SCREENSHOTS", Path(__file__).resolve().parents[2] / "runs" / "screenshots")
)
XSS = '<img src=x onerror="window.__pwned = 1"> <script>window.__pwned = 2</script> ![t](http://127.0.0.1:9/x.png)'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make chromium` or apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    from annotation_app.server import launch

    store = Store(tmp_path_factory.mktemp("browser") / "lab.db")
    store.upsert_project("default", quorum=1, guidelines="Prefer **kind** answers.")
    store.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "prompt_text": f"Prompt number {i}",
                "candidates": [
                    {"label": lab, "text": f"answer {lab}{i}" if lab != "B" else XSS} for lab in "ABCD"
                ],
            }
            for i in range(12)
        ]
    )
    store.add_user("alice", "password-alice")
    store.add_user("root", "password-root", "admin")
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    yield {"url": url, "store": store}
    demo.close()
    store.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


def value(page, elem_id: str) -> str:
    return page.eval_on_selector(f"#{elem_id} textarea, #{elem_id} input", "e => e.value")


def wait_value(page, elem_id: str, needle: str, timeout: float | None = None) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([id, needle]) => { const e = document.querySelector(`#${id} textarea, #${id} input`);"
            " return e && e.value.includes(needle); }",
            arg=[elem_id, needle],
            timeout=timeout or TIMEOUT,
        )
    except PlaywrightTimeout:
        now = page.evaluate(
            "(id) => { const e = document.querySelector(`#${id} textarea, #${id} input`); return e && e.value; }",
            elem_id,
        )
        raise AssertionError(f"#{elem_id} never showed {needle!r}; it shows {now!r}") from None


def wait_for_draft(store, prompt_id: str, text: str, timeout_s: float = TIMEOUT / 1000) -> None:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        row = store.conn.execute(
            "SELECT ranking FROM rankings WHERE prompt_id = ? AND status = 'draft'", (prompt_id,)
        ).fetchone()
        if row is not None and row["ranking"] == text:
            return
        time.sleep(0.1)
    raise AssertionError(f"the draft {text!r} of {prompt_id} was not saved")


def log_in_with_keyboard(page, url: str, user: str = "alice", shows: str = "#prompt") -> None:
    page.goto(url)
    page.get_by_label("username").focus()
    page.keyboard.type(user)
    page.keyboard.press("Tab")
    page.keyboard.type(f"password-{user}")
    page.keyboard.press("Enter")
    if shows == "#prompt":
        wait_value(page, "prompt", "Prompt number")
    else:
        page.wait_for_selector(shows, state="visible", timeout=TIMEOUT)
    page.wait_for_selector("#response-B textarea", timeout=TIMEOUT)  # slots mount a tick after the values


def focus_ranking_field(page) -> None:
    """Alt+R, then wait until the typed-ranking field has the focus: on a slow machine the page's
    key handler can attach after the login shows the prompt, and keys typed before it would go to
    the page, not the field."""
    from playwright.sync_api import (
        TimeoutError as PlaywrightTimeoutError,
    )  # optional: the app fixture skips without it

    focused = "() => !!(document.activeElement && document.activeElement.closest('#ranking'))"
    for _ in range(TIMEOUT // 1000):
        page.keyboard.press("Alt+r")
        try:
            page.wait_for_function(focused, timeout=1000)
            return
        except PlaywrightTimeoutError:
            continue  # the handler was not there yet: a person would press it again
    raise AssertionError("Alt+R never moved the focus to the typed-ranking field")


def chips_in(page, rank: int | str) -> list[str]:
    slot = f"#slot-rank-{rank}" if rank else "#slot-unranked"
    return page.eval_on_selector_all(f"{slot} .chip", "cs => cs.map(c => c.dataset.label)")


def wait_board(page, ranking: str) -> None:
    page.wait_for_function(
        "(r) => { const o = document.querySelector('#board .order'); return o && o.dataset.ranking === r; }",
        arg=ranking,
        timeout=TIMEOUT,
    )


def stored_ranking(store, prompt_id: str) -> str | None:
    row = store.conn.execute(
        "SELECT ranking FROM rankings WHERE prompt_id = ? AND status = 'submitted'", (prompt_id,)
    ).fetchone()
    return None if row is None else row["ranking"]


def in_viewport(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    size = page.viewport_size
    return (
        box is not None
        and box["y"] >= 0
        and box["y"] + box["height"] <= size["height"]
        and box["x"] + box["width"] <= size["width"]
    )


def test_keyboard_only_ranking_with_a_tie_then_typed_ranking_and_reload(app, browser):
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"])
    first = value(page, "prompt-id")
    assert "0 submitted" in value(page, "progress")
    for action in ("#submit", "#skip", "#progress"):  # the action bar needs no scrolling
        assert in_viewport(page, action), f"{action} is not visible at 1366x768 without scrolling"
    assert page.locator("#guidelines").is_visible()  # open for someone who has submitted nothing
    page.mouse.wheel(0, 2000)  # scrolled down to the last response, the action bar stays in view
    page.wait_for_function("window.scrollY > 200", timeout=TIMEOUT)
    assert in_viewport(page, "#submit") and in_viewport(page, "#skip")
    page.mouse.wheel(0, -4000)

    # Keyboard only, on the board: Alt+K focuses it; a letter picks a response, a digit ranks
    # it, "=" ties it with the one placed last; the focus is visible; Enter submits.
    page.keyboard.press("Alt+k")
    for key in ("c", "1", "b", "2", "d", "="):
        page.keyboard.press(key)
    assert page.evaluate("document.activeElement.id") == "chip-D"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused response has no visible focus ring"
    page.keyboard.press("ArrowLeft")  # D -> C ... -> A by arrows, then rank it last
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("document.activeElement.id") == "chip-A"
    page.keyboard.press("3")
    wait_board(page, "C > B = D > A")
    wait_value(page, "ranking", "C > B = D > A")  # the typed field follows the board
    assert chips_in(page, 2) == ["B", "D"]
    wait_for_draft(app["store"], first, "C > B = D > A")
    page.keyboard.press("Enter")
    wait_value(page, "message", f"Saved your ranking of {first}: C > B = D > A")
    assert stored_ranking(app["store"], first) == "C > B = D > A"
    assert "1 submitted" in value(page, "progress")
    second = value(page, "prompt-id")
    assert second != first

    # The typed path is kept: Alt+R, a ranking with a tie; the board's chips follow it, the
    # draft is saved as you go and survives a reload.
    focus_ranking_field(page)
    page.keyboard.type("b = a > d")
    wait_board(page, "A = B > D")
    assert chips_in(page, 1) == ["A", "B"] and chips_in(page, 0) == ["C"]
    wait_for_draft(app["store"], second, "b = a > d")
    page.reload()
    wait_value(page, "prompt", "Prompt number")
    wait_board(page, "A = B > D")
    assert value(page, "prompt-id") == second
    focus_ranking_field(page)
    page.keyboard.press("End")
    page.keyboard.type(" > c")
    page.keyboard.press("Enter")
    wait_value(page, "message", f"Saved your ranking of {second}: A = B > D > C")
    assert stored_ranking(app["store"], second) == "A = B > D > C"
    page.close()


def test_mouse_only_ranking_with_a_tie_and_an_edit_of_the_best_response(app, browser):
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"])
    pid = value(page, "prompt-id")
    # Drag responses into rank slots; two in one slot are a tie.
    page.locator("#chip-D").drag_to(page.locator("#slot-rank-1"))
    wait_board(page, "D")
    page.locator("#chip-A").drag_to(page.locator("#slot-rank-2"))
    page.locator("#chip-C").drag_to(page.locator("#slot-rank-2"))
    wait_board(page, "D > A = C")
    # Click a chip, then a slot: the same move without dragging (touch screens).
    page.locator("#chip-B").click()
    page.locator("#slot-rank-3").click()
    wait_board(page, "D > A = C > B")
    wait_value(page, "ranking", "D > A = C > B")
    # Correct the best response: copy it into the edit box, change it, submit with the mouse.
    page.locator("#edit-box").get_by_text("Correct the best response").click()
    page.locator("#start-edit").click()
    wait_value(page, "edit", f"answer D{pid[1:]}")
    page.locator("#edit textarea").fill("A better answer, written by the annotator.")
    page.locator("#submit").click()
    wait_value(page, "message", f"Saved your ranking of {pid}: D > A = C > B")
    row = (
        app["store"]
        .conn.execute(
            "SELECT ranking, edit FROM rankings WHERE prompt_id = ? AND status = 'submitted'", (pid,)
        )
        .fetchone()
    )
    assert (row["ranking"], row["edit"]) == ("D > A = C > B", "A better answer, written by the annotator.")
    page.close()


def test_revise_from_history_and_export(app, browser, tmp_path):
    page = browser.new_page()
    log_in_with_keyboard(page, app["url"])
    pid = value(page, "prompt-id")
    focus_ranking_field(page)
    page.keyboard.type("a > b > c > d")
    page.keyboard.press("Enter")
    wait_value(page, "message", f"Saved your ranking of {pid}")
    page.get_by_role("tab", name="My history").click()
    page.locator("#history-prompt input").click()
    page.get_by_role("option", name=pid).click()
    page.locator("#history-open").click()
    wait_value(page, "history-ranking", "A > B > C > D")
    page.locator("#history-ranking textarea, #history-ranking input").fill("d > c > a = b")
    page.locator("#revise").click()
    wait_value(page, "history-message", f"Revised {pid}: D > C > A = B (revision 1)")

    out = tmp_path / "export.jsonl"
    export_rankings(app["store"], str(out))
    records = {r["prompt_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[pid]["ranking"] == "D > C > A = B"
    page.close()


def test_html_in_a_response_is_shown_as_text_and_runs_nothing(app, browser):
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    log_in_with_keyboard(page, app["url"])
    assert value(page, "response-B") == XSS  # shown literally
    assert page.locator("#response-B img").count() == 0
    page.locator("#rendered-toggle input").check()  # the optional rendered view
    page.wait_for_selector("#rendered-B", state="visible", timeout=TIMEOUT)
    rendered = page.inner_html("#rendered-B")
    assert "<img" not in rendered and "&lt;img" in rendered
    page.wait_for_timeout(500)
    assert page.evaluate("window.__pwned") is None
    assert not [u for u in requests if "x.png" in u or u.endswith("/x")]
    page.close()


def test_screenshots_of_the_ranking_screen_and_the_dashboard(app, browser):
    """Pictures for a reviewer (under runs/screenshots/ or $RLHF_SCREENSHOTS), and what they show."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in ((1366, 768), (1920, 1080)):
        page = browser.new_page(viewport={"width": width, "height": height})
        log_in_with_keyboard(page, app["url"], "root")
        page.locator("#chip-C").drag_to(page.locator("#slot-rank-1"))
        page.locator("#chip-A").drag_to(page.locator("#slot-rank-2"))
        page.locator("#chip-D").drag_to(page.locator("#slot-rank-2"))
        wait_board(page, "C > A = D")
        for action in ("#submit", "#skip", "#progress", "#board"):
            assert in_viewport(page, action), f"{action} is off screen at {width}x{height}"
        page.screenshot(path=str(SCREENSHOTS / f"ranking_{width}x{height}.png"))
        page.close()


class Clock:
    def __init__(self, t: float = 1_750_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_dashboard_rounds_its_figures_and_draws_its_charts(browser, tmp_path):
    from annotation_app.server import launch

    clock = Clock()
    store = Store(tmp_path / "dash.db", clock=clock)
    store.upsert_project("default", quorum=3)
    store.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"Prompt number {i}",
                "candidates": [{"label": lab, "text": lab} for lab in "ABCD"],
            }
            for i in range(12)
        ]
    )
    names = ["ana", "ben", "cleo", "dev"]  # dev ranks everything backwards
    for name in names:
        store.add_user(name, f"password-{name}")
    store.add_user("root", "password-root", "admin")
    orders = ["A > B = C > D", "A > C > B > D", "B > A > C = D"]
    for step in range(30):
        name = names[step % 4]
        item = store.next_item(name)
        clock.t += 7 + (step * 37) % 80  # seconds spent on the item
        store.submit(
            name, item.prompt_id, "D > C > B > A" if name == "dev" else orders[step % 3], [], "", None
        )
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        log_in_with_keyboard(page, url, "root")
        page.get_by_role("tab", name="Admin").click()
        wait_value(page, "admin-message", "30 submitted rankings")
        headline = page.inner_text("#admin-headline")
        assert "30 / 36 (83 %)" in headline and "median seconds per item" in headline
        numbers = [
            t for t in headline.replace("[", " ").replace("]", " ").replace(",", " ").split() if "." in t
        ]
        assert numbers and all(len(t.split(".")[1]) <= 3 for t in numbers), headline  # rounded
        for chart in ("admin-progress", "admin-seconds", "admin-throughput", "admin-agreement"):
            page.wait_for_selector(f"#{chart} canvas, #{chart} svg", timeout=TIMEOUT)
        annotators = page.inner_text("#admin-annotators")
        assert "dev" in annotators
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "dashboard_1366x768.png"), full_page=True)
        page.close()
    finally:
        demo.close()
        store.close()


def test_a_conversation_prompt_is_shown_as_a_chat_transcript(browser, tmp_path):
    from annotation_app.server import launch

    store = Store(tmp_path / "chat.db")
    store.upsert_project("default", quorum=1)
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its population? <b>bold?</b>"},
    ]
    store.add_items(
        [
            {
                "prompt_id": "chat0",
                "prompt": conversation,
                "candidates": [{"label": lab, "text": f"reply {lab}"} for lab in "AB"],
            }
        ]
    )
    store.add_user("alice", "password-alice")
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        log_in_with_keyboard(page, url, shows="#conversation")
        assert not page.locator("#prompt").is_visible()
        transcript = page.inner_text("#conversation")
        for turn in conversation:
            assert turn["content"].split(" <b>")[0] in transcript
        assert "<b>bold?</b>" in transcript  # shown as text, not rendered
        assert page.locator("#conversation b").count() == 0
        assert not page.locator('#conversation button[aria-label="Clear"]').is_visible()  # read-only
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "conversation_1366x768.png"))
        page.keyboard.press("Alt+k")
        for key in ("b", "1", "a", "2", "Enter"):
            page.keyboard.press(key)
        wait_value(page, "message", "Saved your ranking of chat0: B > A")
        page.close()
    finally:
        demo.close()
        store.close()


def test_ticking_the_box_shows_the_models_suggestion(app, browser):
    store = app["store"]
    store.add_user("bob", "password-bob")  # a fresh annotator: the box starts unticked
    store.set_proposals({f"p{i}": "C > B = D > A" for i in range(12)}, source="test")
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    log_in_with_keyboard(page, app["url"], "bob")
    assert not page.locator("#proposal").is_visible()  # not opted in: nothing shown
    page.locator("#show-proposals input").check()
    wait_value(page, "proposal", "Model's suggestion: C > B = D > A")
    wait_value(page, "message", "The model's suggested ranking is shown")
    assert store.shows_proposals("bob")
    for action in ("#submit", "#skip", "#progress"):
        assert in_viewport(page, action), f"{action} is not visible at 1366x768 without scrolling"
    page.reload()  # the choice is kept
    wait_value(page, "proposal", "Model's suggestion: C > B = D > A")
    assert page.locator("#show-proposals input").is_checked()
    page.close()
