"""The running app over plain HTTP and gradio_client: login required everywhere, identity from the
session only, annotators isolated, admin handlers refuse annotators, the named API works."""

from __future__ import annotations

import json
import re
import socket
import uuid

import httpx
import pytest

from annotation_app.store import Store

PASSWORDS = {"ann1": "password-one", "ann2": "password-two", "boss": "password-boss"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from annotation_app.server import launch

    store = Store(tmp_path_factory.mktemp("app") / "lab.db")
    store.upsert_project("default", quorum=2)
    store.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "prompt_text": f"prompt {i}",
                "candidates": [{"label": lab, "text": f"SECRET-{lab}{i}"} for lab in "ABC"],
            }
            for i in range(4)
        ]
    )
    store.add_user("ann1", PASSWORDS["ann1"])
    store.add_user("ann2", PASSWORDS["ann2"])
    store.add_user("boss", PASSWORDS["boss"], "admin")
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    yield {"url": url.rstrip("/"), "store": store, "demo": demo}
    demo.close()
    store.close()


def client(server, user: str):
    from gradio_client import Client

    return Client(server["url"], auth=(user, PASSWORDS[user]), verbose=False, analytics_enabled=False)


def login(server, user: str) -> httpx.Client:
    c = httpx.Client(base_url=server["url"], timeout=30)
    r = c.post("/login", data={"username": user, "password": PASSWORDS[user]})
    assert r.status_code == 200, r.text
    return c


def call_private(server, http: httpx.Client, fn_name: str, data: list) -> dict:
    """Call a page-only (private) handler the way the browser does: queue/join + SSE stream."""
    demo = server["demo"]
    fn_index = next(i for i, f in demo.fns.items() if getattr(f.fn, "__name__", "") == fn_name)
    session = uuid.uuid4().hex
    r = http.post(
        "/gradio_api/queue/join",
        json={
            "data": data,
            "fn_index": fn_index,
            "session_hash": session,
            "event_data": None,
            "trigger_id": None,
        },
    )
    assert r.status_code == 200, r.text
    with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg["output"]
    raise AssertionError("no result")


def test_unauthenticated_requests_are_refused(server):
    url = server["url"]
    refused = [
        ("GET", "/config"),
        ("GET", "/gradio_api/info"),
        ("GET", "/gradio_api/openapi.json"),
        ("POST", "/gradio_api/queue/join"),
        ("GET", "/gradio_api/queue/data?session_hash=x"),
        ("POST", "/gradio_api/call/next"),
        ("POST", "/gradio_api/call/submit"),
        ("POST", "/gradio_api/run/next"),
        ("GET", "/gradio_api/file=/etc/passwd"),
        ("POST", "/gradio_api/upload"),
    ]
    for method, path in refused:
        r = httpx.request(method, url + path, json={} if method == "POST" else None, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    big = httpx.post(url + "/gradio_api/queue/join", content=b"x" * 2_000_000, timeout=30)
    assert big.status_code == 413  # oversized bodies are refused before any route runs
    page = httpx.get(url + "/", timeout=30)
    assert "SECRET-" not in page.text and "prompt 0" not in page.text  # the login page, no app content
    bad = httpx.post(url + "/login", data={"username": "ann1", "password": "wrong-password"}, timeout=30)
    assert bad.status_code in (400, 401) and not bad.cookies  # refused, no session cookie
    from gradio_client import Client

    with pytest.raises(Exception, match="(?i)invalid credentials|could not login"):
        Client(url, auth=("ann1", "wrong-password"), verbose=False, analytics_enabled=False)


def test_api_next_submit_and_isolation(server):
    c1, c2 = client(server, "ann1"), client(server, "ann2")
    item = c1.predict(api_name="/next")
    assert item["ok"] and item["labels"] == ["A", "B", "C"] and item["responses"]["A"].startswith("SECRET-A")
    res = c1.predict(item["prompt_id"], "c > a = b", [], "fine", "tok-1", api_name="/submit")
    assert res.pop("server_ms") >= 0
    assert res == {
        "ok": True,
        "prompt_id": item["prompt_id"],
        "status": "submitted",
        "ranking": "C > A = B",
        "flags": [],
        "duplicate": False,
        "revision": 0,
    }
    again = c1.predict(item["prompt_id"], "c > a = b", [], "fine", "tok-1", api_name="/submit")
    assert again["duplicate"] is True
    # ann2 can neither submit for a prompt leased to nobody-but-ann1 nor read ann1's ranking.
    item2 = c2.predict(api_name="/next")
    bad = c2.predict(
        item["prompt_id"] if item2["prompt_id"] != item["prompt_id"] else "p3",
        "A > B > C",
        [],
        "",
        "tok-x",
        api_name="/submit",
    )
    assert bad["ok"] is False and bad["code"] in ("not_assigned", "already_done")
    for code, args in [
        ("unknown_label", ("A > D", [])),
        ("missing_label", ("A > B", [])),
        ("bad_flag", ("A > B > C", ["gold"])),
        ("too_long", ("A" * 1000, [])),
    ]:
        out = c2.predict(item2["prompt_id"], args[0], args[1], "", "", api_name="/submit")
        assert out["ok"] is False and out["code"] == code, out
    # The page's own handlers take identity from the session, not from inputs.
    http2 = login(server, "ann2")
    out = call_private(server, http2, "on_open", [item["prompt_id"]])
    # refused either by the dropdown (not one of ann2's prompts) or by the store (not ann2's ranking)
    text = json.dumps(out)
    assert "SECRET" not in text and (
        "no submitted ranking" in text or "not in the list of choices" in text
    ), text
    out = call_private(server, http2, "on_revise", [item["prompt_id"], "A > B > C", False, "", "t"])
    assert "Revised" not in json.dumps(out)
    assert server["store"].submitted_rankings()[0]["ranking"] == "C > A = B"
    assert server["store"].history("ann2") == []
    # The optional edit, by keyword: refused while the top is tied, stored with a single best.
    tied = c2.predict(item2["prompt_id"], "A = B > C", [], "", "tok-e1", edit="better A", api_name="/submit")
    assert tied["ok"] is False and tied["code"] == "edit_needs_single_best", tied
    edited = c2.predict(
        item2["prompt_id"], "B > A > C", [], "", "tok-e2", edit="better B", api_name="/submit"
    )
    assert edited["ok"] is True and edited["status"] == "submitted", edited
    stored = [r for r in server["store"].submitted_rankings() if r["prompt_id"] == item2["prompt_id"]]
    assert [(r["edit"], r["edit_of"]) for r in stored] == [("better B", "B")]


def test_admin_functions_refuse_annotators(server):
    http1 = login(server, "ann1")
    out = call_private(server, http1, "on_admin_refresh", [])
    assert "needs an admin account" in json.dumps(out)
    out = call_private(server, http1, "on_admin_export", ["rankings"])
    assert "needs an admin account" in json.dumps(out)
    boss = login(server, "boss")
    out = call_private(server, boss, "on_admin_refresh", [])
    text = json.dumps(out)
    assert "Krippendorff" in text and "ann1" in text  # the dashboard's headline and tables
    out = call_private(server, boss, "on_admin_export", ["pairs"])
    # ann1's C > A = B (2 strict pairs + 1 tie) and ann2's B > A > C (3 strict pairs)
    assert "Exported 6 pairs records" in json.dumps(out)
    [link] = re.findall(r"\]\((export/[^)]+)\)", out["data"][0])  # admin-download: Markdown
    url = f"{server['url']}/{link}"
    assert httpx.get(url, timeout=30).status_code == 401  # the export file needs a login too
    assert http1.get(url).status_code == 403  # and an admin
    download = boss.get(url)
    assert download.headers["content-disposition"] == 'attachment; filename="pairs.jsonl"'
    lines = download.text.splitlines()
    assert len(lines) == 6 and sum(json.loads(x)["tie"] for x in lines) == 1
    assert boss.get(url).json()["code"] == "no_such_export"  # deleted once downloaded


def test_arena_admin_events_refuse_annotators(server):
    http1 = login(server, "ann1")
    for fn_name, data in (("on_arena_leaderboard", [""]), ("on_arena_export", [])):
        assert "needs an admin account" in json.dumps(call_private(server, http1, fn_name, data))
    boss = login(server, "boss")
    assert "no arena votes yet" in json.dumps(call_private(server, boss, "on_arena_leaderboard", [""]))


def test_simulated_annotators_through_the_api(server):
    from annotation_app.simulated_client import ranking_from_scores, run_annotators
    from rlhf.scorers import get_scorer

    assert ranking_from_scores("ABC", [0.1, 0.9, 0.12], 0.05) == "B > A = C"
    assert ranking_from_scores("ABC", [1.0, 2.0, 3.0]) == "C > B > A"
    store = server["store"]
    before = {(r["annotator"], r["prompt_id"]) for r in store.submitted_rankings()}
    logs = run_annotators(
        server["url"] + "/",
        [("ann1", PASSWORDS["ann1"]), ("ann2", PASSWORDS["ann2"])],
        get_scorer("length:target=3"),
        duration_s=3,
        double_submit=0.5,
        transport="http",
    )
    assert not [e for log in logs for e in log.errors + log.transport_errors]
    acked = {(log.user, pid): ranking for log in logs for pid, ranking in log.acked}
    stored = {(r["annotator"], r["prompt_id"]): r["ranking"] for r in store.submitted_rankings()}
    assert acked and all(stored[k] == v for k, v in acked.items())
    assert set(stored) - before == set(acked)  # nothing stored that was not acknowledged


def test_password_guessing_is_throttled(server):
    url = server["url"]
    # uvicorn takes the client's address from X-Forwarded-For when the request comes from
    # 127.0.0.1 (FORWARDED_ALLOW_IPS' default): two "clients" from one test.
    guesser, user = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.2"}
    for _ in range(3):
        r = httpx.post(
            url + "/login", data={"username": "ann2", "password": "guess-guess"}, headers=guesser, timeout=30
        )
        assert r.status_code in (400, 401)
    right = {"username": "ann2", "password": PASSWORDS["ann2"]}
    refused = httpx.post(url + "/login", data=right, headers=guesser, timeout=30)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1  # even the right one
    assert httpx.post(url + "/login", data=right, headers=user, timeout=30).status_code == 200
