"""The app's protections: login throttling per (user name, client), session lifetime, the anonymous
page, malformed calls. Units with a fake clock, then the running app over plain HTTP.
(Export downloads: test_security_exports.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from types import SimpleNamespace

import httpx
import pytest

from annotation_app.auth import LoginThrottle, client_key
from annotation_app.exports import ExportRegistry
from annotation_app.server import housekeeping
from annotation_app.sessions import SessionLifetime
from annotation_app.store import Store
from tests.annotation_app.test_app_http import PASSWORDS, call_private, free_port, login


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- the login throttle


def fail(throttle: LoginThrottle, user: str, client: str) -> None:
    """One wrong password: the throttle let the try go ahead and it failed."""
    assert throttle.attempt(user, client) == 0
    throttle.failed(user, client)


def test_backoff_grows_and_a_success_resets_it():
    clock = Clock()
    throttle = LoginThrottle(free_failures=3, base_delay_s=1, max_delay_s=8, clock=clock)
    for _ in range(3):  # the first failures cost nothing: people mistype
        fail(throttle, "ann1", "10.0.0.1")
    waits = []
    for _ in range(5):
        waits.append(throttle.attempt("ann1", "10.0.0.1"))
        assert throttle.attempt("ann1", "10.0.0.1") == waits[-1]  # a refused try changes nothing
        clock.t += waits[-1]  # the client waits exactly as long as it is told, then fails again
        fail(throttle, "ann1", "10.0.0.1")
    assert waits == [1, 2, 4, 8, 8]  # doubling, capped at max_delay_s
    clock.t += 8
    assert throttle.attempt("ann1", "10.0.0.1") == 0
    throttle.succeeded("ann1", "10.0.0.1")  # the right password: the record is cleared
    for _ in range(3):
        fail(throttle, "ann1", "10.0.0.1")  # free failures again
    assert throttle.attempt("ann1", "10.0.0.1") == 1


def test_parallel_tries_count_before_their_result():
    throttle = LoginThrottle(free_failures=3, clock=Clock())
    # Ten tries sent at once: each counts when it goes ahead, before any password check ends.
    allowed = [throttle.attempt("ann1", "203.0.113.7") == 0 for _ in range(10)]
    assert allowed == [True] * 3 + [False] * 7


def test_a_login_wave_from_one_address_is_not_refused():
    throttle = LoginThrottle(client_free_failures=5, clock=Clock())
    # 200 annotators behind one address log in at once: each name tries once and succeeds.
    assert all(throttle.attempt(f"ann{i}", "192.0.2.1") == 0 for i in range(200))
    for i in range(200):
        throttle.succeeded(f"ann{i}", "192.0.2.1")
    assert throttle.attempt("ann7", "192.0.2.1") == 0


def test_the_real_user_is_not_slowed_by_someone_elses_guesses():
    throttle = LoginThrottle(free_failures=3, clock=Clock())
    for _ in range(3):
        fail(throttle, "ann1", "203.0.113.7")
    assert throttle.attempt("ann1", "203.0.113.7") > 0
    assert throttle.attempt("ann1", "198.51.100.2") == 0  # the same name from another client
    assert throttle.attempt("ann2", "203.0.113.7") == 0  # another name from the guesser: its own count


def test_a_client_guessing_many_names_is_slowed_and_forgotten_later():
    clock = Clock()
    throttle = LoginThrottle(free_failures=3, client_free_failures=5, forget_s=900, clock=clock)
    for i in range(5):
        fail(throttle, f"user{i}", "203.0.113.7")  # one failure per name
    wait = throttle.attempt("someone-else", "203.0.113.7")
    assert wait > 0  # any name, from that client
    assert throttle.attempt("someone-else", "198.51.100.2") == 0
    clock.t += wait
    assert throttle.attempt("user0", "203.0.113.7") == 0
    throttle.succeeded("user0", "203.0.113.7")  # a valid account does not reset the client:
    fail(throttle, "someone-else", "203.0.113.7")  # its next failure doubles the wait
    assert throttle.attempt("someone-else", "203.0.113.7") == 2 * wait
    clock.t += 900
    assert throttle.attempt("someone-else", "203.0.113.7") == 0  # forgotten after forget_s


def test_clients_are_keyed_by_address_ipv6_by_network_and_the_table_is_bounded():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"
    assert client_key(None) == "unknown" and client_key("testclient") == "testclient"
    throttle = LoginThrottle(max_records=10, clock=Clock())
    for i in range(100):
        fail(throttle, f"user{i}", f"10.0.0.{i}")
    assert len(throttle._failures) == 10


# ----------------------------------------------------------------------------- session lifetime


def test_sessions_end_after_their_lifetime_and_unknown_tokens_count_as_ended():
    clock = Clock()
    sessions = SessionLifetime(lifetime_s=60, clock=clock)
    tokens = {"t1": "ann1"}  # Gradio's table: token -> user name
    sessions.stamp_new(tokens)
    clock.t += 30
    tokens["t2"] = "ann2"
    sessions.stamp_new(tokens)  # t1 keeps its login time
    sessions.end_if_expired(tokens, "t1")
    assert tokens == {"t1": "ann1", "t2": "ann2"}
    clock.t += 30
    sessions.end_if_expired(tokens, "t1")
    assert tokens == {"t2": "ann2"}  # t1 is over: Gradio no longer knows it
    tokens["forged"] = "boss"  # a token that no login of ours stamped: fail closed
    sessions.end_if_expired(tokens, "forged")
    assert "forged" not in tokens
    clock.t += 30
    sessions.prune(tokens)
    assert tokens == {} and not sessions._started


def test_housekeeping_sweeps_while_serving_and_cleans_up_at_shutdown(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clock = Clock(time.time())
    sessions = SessionLifetime(lifetime_s=60, clock=clock)
    registry = ExportRegistry(lifetime_s=60, clock=clock)
    app = SimpleNamespace(tokens={"old": "ann1"})
    sessions.stamp_new(app.tokens)
    with registry.new("boss") as export:
        (export.folder / "rankings.jsonl").write_text("{}\n")

    async def serve_a_while():
        async with housekeeping(sessions, registry, every_s=0.01)(app):
            clock.t += 60
            await asyncio.sleep(0.2)
            assert app.tokens == {} and not export.folder.exists()  # swept while serving
            assert registry.folder.exists()

    asyncio.run(serve_a_while())
    assert registry.folder is None and not list(tmp_path.iterdir())  # shutdown removed the folder


# ----------------------------------------------------------------------------- the running app


def make_store(path) -> Store:
    store = Store(path)
    store.upsert_project("default", quorum=2)
    store.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "prompt_text": f"prompt {i}",
                "candidates": [{"label": lab, "text": f"SECRET-{lab}{i}"} for lab in "ABC"],
            }
            for i in range(3)
        ]
    )
    store.add_user("ann1", PASSWORDS["ann1"])
    store.add_user("ann2", PASSWORDS["ann2"])
    store.add_user("boss", PASSWORDS["boss"], "admin")
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from annotation_app.server import launch

    store = make_store(tmp_path_factory.mktemp("security") / "lab.db")
    demo, url = launch(store, port=free_port(), block=False, quiet=True)
    yield {"url": url.rstrip("/"), "store": store, "demo": demo}
    demo.close()
    store.close()


def post_login(url: str, user: str, password: str, client: str) -> httpx.Response:
    # uvicorn takes the client's address from X-Forwarded-For when the request comes from
    # 127.0.0.1 (FORWARDED_ALLOW_IPS' default): several "clients" from one test.
    return httpx.post(
        url + "/login",
        data={"username": user, "password": password},
        headers={"X-Forwarded-For": client},
        timeout=30,
    )


def test_the_real_user_logs_in_from_another_client_while_a_guesser_waits(server):
    url = server["url"]
    for _ in range(3):
        assert post_login(url, "ann1", "guess-guess", "203.0.113.7").status_code == 400
    t0 = time.perf_counter()
    refused = post_login(url, "ann1", PASSWORDS["ann1"], "203.0.113.7")
    assert time.perf_counter() - t0 < 1  # refused at once: no password check, no sleeping
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "try again in 1 s" in refused.json()["detail"] and not refused.cookies
    real = post_login(url, "ann1", PASSWORDS["ann1"], "198.51.100.2")
    assert real.status_code == 200 and real.cookies  # the real user, from their own client
    time.sleep(1.1)
    assert post_login(url, "ann1", "guess-again", "203.0.113.7").status_code == 400  # waited: one try
    again = post_login(url, "ann1", "guess-more", "203.0.113.7")
    assert again.status_code == 429 and again.headers["retry-after"] == "2"  # the wait doubled


def test_the_anonymous_page_has_no_api_description(server):
    anonymous = httpx.get(server["url"] + "/", timeout=30)
    assert anonymous.status_code == 200 and '"auth_required":true' in anonymous.text.replace(" ", "")
    assert '"named_endpoints": {}' in anonymous.text  # the description Gradio embeds, emptied
    for secret in ("/submit", "api_submit", "prompt_id", "client_token", "admin-export", "SECRET-"):
        assert secret not in anonymous.text, secret
    page = login(server, "ann1").get("/")  # logged in: the page and its API description, as before
    assert "prompt_id" in page.text and "/submit" in page.text and "admin-export" in page.text


def test_the_named_api_keeps_its_description_for_gradio_client(server):
    from gradio_client import Client

    client = Client(server["url"], auth=("ann2", PASSWORDS["ann2"]), verbose=False, analytics_enabled=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in endpoints["/submit"]["parameters"]] == [
        "prompt_id",
        "ranking",
        "flags",
        "comment",
        "client_token",
        "edit",
    ]
    assert [p["parameter_has_default"] for p in endpoints["/submit"]["parameters"]] == [False] * 5 + [True]
    bad = client.predict("p0", 7, [], "", "tok", api_name="/submit")  # the client does not check types
    assert bad == {
        "ok": False,
        "code": "bad_request",
        "message": "/submit: ranking must be a string, got a whole number",
    }


def call_named(http: httpx.Client, name: str, data) -> dict:
    """A raw two-step call: POST /gradio_api/call/NAME, then read its result stream."""
    r = http.post(f"/gradio_api/call/{name}", json={"data": data})
    assert r.status_code == 200, r.text
    stream = http.get(f"/gradio_api/call/{name}/{r.json()['event_id']}").text
    event, payload = [line.split(":", 1)[1].strip() for line in stream.splitlines() if line][:2]
    assert event == "complete", stream
    return json.loads(payload)[0]


@pytest.fixture()
def server_errors(capfd):
    """What the server printed (stderr: Gradio's queue prints tracebacks there) and logged through
    uvicorn (which logs "Exception in ASGI application" with the traceback) during the test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)

    def read() -> str:
        time.sleep(0.3)  # uvicorn logs an ASGI exception after the response has gone
        logged = [r.getMessage() + ("Traceback" if r.exc_info else "") for r in records]
        return capfd.readouterr().err + "\n".join(logged)

    yield read
    uvicorn_log.removeHandler(handler)


def test_malformed_api_calls_answer_bad_request(server, server_errors):
    http = login(server, "ann2")
    submit = "/submit takes 5 to 6 inputs (prompt_id, ranking, flags, comment, client_token[, edit])"
    for name, data, message in [
        ("submit", ["p0"], f"{submit}, got 1"),
        ("submit", ["p0", "A > B > C", [], "", "t", "an edit", "extra"], f"{submit}, got 7"),
        ("submit", ["p0", "A > B > C", [], "", "t", 7], "/submit: edit must be a string, got a whole number"),
        ("submit", [1, "A > B > C", [], "", "t"], "/submit: prompt_id must be a string, got a whole number"),
        (
            "submit",
            ["p0", "A > B > C", {"all_bad": True}, "", "t"],
            "/submit: flags must be a list of strings, got an object",
        ),
        (
            "submit",
            ["p0", "A > B > C", ["all_bad", 3], "", "t"],
            "/submit: flags must be a list of strings, got a list",
        ),
        ("skip", ["p0", True], "/skip: client_token must be a string, got true"),
        ("next", ["p0"], "/next takes 0 inputs, got 1"),
    ]:
        out = call_named(http, name, data)
        assert out == {"ok": False, "code": "bad_request", "message": message}, out
    # The direct route answers the same way.
    direct = http.post("/gradio_api/run/skip", json={"data": []}).json()["data"][0]
    assert direct["code"] == "bad_request" and "/skip takes 2 inputs" in direct["message"]
    # Calls that fail before any endpoint runs: one line each, code bad_request.
    for method_path, body, status, message in [
        ("/gradio_api/call/v2/submit", {"prompt_id": "p0"}, 400, "No value provided for required argument"),
        ("/gradio_api/call/nonexistent", {"data": []}, 404, "no such API endpoint"),
        ("/gradio_api/call/submit", {"data": "not a list"}, 422, "data: Input should be a valid list"),
        ("/gradio_api/queue/join", {"data": [], "fn_index": 9999, "session_hash": "x"}, 404, "no such event"),
    ]:
        r = http.post(method_path, json=body)
        assert r.status_code == status and r.json()["code"] == "bad_request", (method_path, r.text)
        assert r.json()["message"].startswith(message), r.text
    # Well-formed calls still work, the optional edit left out or sent.
    item = call_named(http, "next", [])
    assert item["ok"] is True and item["prompt_id"]
    ranking = " > ".join(item["labels"])
    without_edit = call_named(http, "submit", [item["prompt_id"], ranking, [], "", "t-raw"])
    assert without_edit["ok"] is True and without_edit["status"] == "submitted", without_edit
    item = call_named(http, "next", [])
    first = item["labels"][0]
    with_edit = call_named(http, "submit", [item["prompt_id"], ranking, [], "", "t-raw-2", f"{first}, fixed"])
    assert with_edit["ok"] is True and with_edit["status"] == "submitted", with_edit
    printed = server_errors()
    assert "Traceback" not in printed and "Exception in ASGI application" not in printed, printed


def test_malformed_page_events_log_no_traceback(server, server_errors):
    http = login(server, "ann1")
    for fn_name, data, message in [
        ("on_admin_export", [], "on_admin_export takes 1 inputs (fmt), got 0"),
        ("on_admin_export", [5], "on_admin_export: fmt must be a string, got a whole number"),
        ("on_submit", ["p0", "t", "A > B > C", "yes", "", ""], "on_submit: bad must be true or false"),
        ("on_open", [{"x": 1}], "on_open: pid must be a string, got an object"),
    ]:
        out = call_private(server, http, fn_name, data)
        assert out["error"].startswith(f"Bad request: {message}"), out
    refused_choice = call_private(server, http, "on_admin_export", ["xml"])  # a choice not offered
    assert "not in the list of choices" in refused_choice["error"]
    printed = server_errors()
    assert "Traceback" not in printed and "Exception in ASGI application" not in printed, printed


def test_a_session_ends_after_its_lifetime(tmp_path):
    from annotation_app.server import launch

    store = make_store(tmp_path / "lab.db")
    demo, url = launch(store, port=free_port(), block=False, quiet=True, session_hours=1.5 / 3600)
    try:
        http = httpx.Client(base_url=url.rstrip("/"), timeout=30)
        assert (
            http.post("/login", data={"username": "ann1", "password": PASSWORDS["ann1"]}).status_code == 200
        )
        assert http.get("/config").status_code == 200
        assert "prompt_id" in http.get("/").text
        time.sleep(1.6)
        assert http.get("/config").status_code == 401  # the cookie now counts as anonymous
        assert http.get("/gradio_api/info").status_code == 401
        page = http.get("/")
        assert '"auth_required":true' in page.text.replace(" ", "") and "prompt_id" not in page.text
        assert not demo.server_app.tokens  # the session is gone from Gradio's table
        assert (
            http.post("/login", data={"username": "ann1", "password": PASSWORDS["ann1"]}).status_code == 200
        )
        assert http.get("/config").status_code == 200  # logging in again starts a new session
    finally:
        demo.close()
        store.close()
