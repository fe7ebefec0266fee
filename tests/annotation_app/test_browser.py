"""Real-browser tests: Playwright driving Debian's chromium against the running app."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from annotation_app.io import export_rankings
from annotation_app.store import Store

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
TIMEOUT = 60_000  # ms; generous: the test machine is shared and often saturated
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
            for i in range(4)
        ]
    )
    store.add_user("alice", "password-alice")
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


def log_in_with_keyboard(page, url: str) -> None:
    page.goto(url)
    page.get_by_label("username").focus()
    page.keyboard.type("alice")
    page.keyboard.press("Tab")
    page.keyboard.type("password-alice")
    page.keyboard.press("Enter")
    wait_value(page, "prompt", "Prompt number")
    page.wait_for_selector("#response-B textarea", timeout=TIMEOUT)  # slots mount a tick after the values


def test_keyboard_ranking_with_tie_reload_progress_revise_export(app, browser, tmp_path):
    page = browser.new_page()
    log_in_with_keyboard(page, app["url"])
    first = value(page, "prompt-id")
    assert "0 submitted" in value(page, "progress")

    # Keyboard only: Alt+R jumps to the ranking field, type a ranking with a tie, Enter submits.
    page.keyboard.press("Alt+r")
    page.keyboard.type("b = a > d > c")
    # the rank selectors follow the text: A and B share rank 1 (a tie)
    page.wait_for_function(
        "document.querySelector('#rank-A input[value=\"1\"]').checked "
        "&& document.querySelector('#rank-B input[value=\"1\"]').checked "
        "&& document.querySelector('#rank-C input[value=\"3\"]').checked",
        timeout=TIMEOUT,
    )
    page.keyboard.press("Enter")
    wait_value(page, "message", f"Saved your ranking of {first}: A = B > D > C")
    assert "1 submitted" in value(page, "progress")
    second = value(page, "prompt-id")
    assert second != first

    # On the next prompt, rank with the selectors instead: the text follows (C = rank 1, A and D
    # tied at rank 2), the draft is saved as you go and survives a reload.
    page.check('#rank-C input[value="1"]')
    wait_value(page, "ranking", "C")
    page.check('#rank-A input[value="2"]')
    wait_value(page, "ranking", "C > A")
    page.check('#rank-D input[value="2"]')
    wait_value(page, "ranking", "C > A = D")
    wait_for_draft(app["store"], second, "C > A = D")  # saved by the input events, not by a button
    page.reload()
    wait_value(page, "prompt", "Prompt number")
    wait_value(page, "ranking", "C > A = D")
    assert value(page, "prompt-id") == second
    assert page.is_checked('#rank-D input[value="2"]') and page.is_checked('#rank-C input[value="1"]')
    assert "1 submitted" in value(page, "progress")

    # Revise the first submission from the history tab.
    page.get_by_role("tab", name="My history").click()
    page.locator("#history-prompt input").click()
    page.get_by_role("option", name=first).click()
    page.locator("#history-open").click()
    wait_value(page, "history-ranking", "A = B > D > C")
    page.locator("#history-ranking textarea, #history-ranking input").fill("d > c > a = b")
    page.locator("#revise").click()
    wait_value(page, "history-message", f"Revised {first}: D > C > A = B (revision 1)")

    out = tmp_path / "export.jsonl"
    export_rankings(app["store"], str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["annotator"], r["ranking"]) for r in records] == [
        (first, "alice", "D > C > A = B")
    ]
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
