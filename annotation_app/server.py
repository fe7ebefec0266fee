"""Serving the annotation app: login, sessions, request limits, downloads, launch (Gradio's
server under uvicorn).

:func:`launch` builds the page (:mod:`annotation_app.app`) and serves it with login against the
store; :func:`serve` and :func:`serve_candidates` are the ``rlhf annotate serve`` and
``rlhf quickstart --annotate`` entry points.

Security (each protection with its test: ``docs/annotation-security.md``):

* Login required everywhere: Gradio's ``launch(auth=...)`` checks the store's scrypt hashes off
  the event loop (:func:`make_auth`); every route that serves the app (``/config``,
  ``/gradio_api/info``, the queue, ``/call``, file routes, uploads) answers 401 without a session
  cookie.
* Password guessing is slowed per (user name, client), never by locking the account for everyone
  (:class:`~annotation_app.auth.LoginThrottle`): after 3 wrong passwords a client waits 1 s, then
  twice as long after each further failure (at most 60 s), and a client failing for many names
  waits too. A try during the wait gets 429 with ``Retry-After`` at once, without a password
  check, so hammering costs the server nothing. Gradio calls ``auth(username, password)`` only;
  the client's address reaches it through :class:`RequestClient` (behind a reverse proxy, uvicorn
  takes it from ``X-Forwarded-For`` when the proxy's address is in ``FORWARDED_ALLOW_IPS``,
  default 127.0.0.1).
* Sessions end ``session_hours`` (default 12) after login
  (:class:`~annotation_app.sessions.SessionExpiry`): the cookie then counts as anonymous.
* Anonymous visitors get the login page without the API description Gradio embeds in every page
  (:class:`~annotation_app.sessions.AnonymousPage`).
* Identity only from the session: handlers take the user from ``gr.Request.username``, never from
  inputs; prompt ids and tokens sent by the page are checked against the caller's own leases and
  rows. Admin handlers check the caller's role on every call, not just the tab's visibility.
* Exports are private downloads (:mod:`annotation_app.exports`): written into a 0700 folder under
  a random token for the admin who made them, served at ``/export/<token>/<name>`` to that admin
  only (:class:`ExportDownloads`), deleted once downloaded, after 10 minutes unclaimed, and at shutdown; nothing goes
  through Gradio's file cache.
* Malformed calls get one-line answers and print no traceback (:func:`annotation_app.api.guard_calls`,
  :data:`annotation_app.api.EXCEPTION_HANDLERS`): the named endpoints answer
  ``{"ok": false, "code": "bad_request", "message"}`` for a wrong number or type of inputs, the
  page's events a plain error.
* Untrusted text is shown literally: responses in non-interactive text boxes (never ``gr.HTML``);
  the optional rendered view escapes HTML and turns Markdown images into links
  (:mod:`annotation_app.text`).
* Bound to 127.0.0.1 unless told otherwise, analytics off, request bodies over 1 MB refused (413)
  before any route runs (:class:`BodySizeLimit`), text sizes limited in the store.

Sessions, throttle records and exports live in this process's memory (as Gradio's sessions do):
with several server processes behind one address, each client must stay on one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
from contextvars import ContextVar

import anyio
from fastapi import HTTPException
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse

from annotation_app import api, exports
from annotation_app.app import PAGE_CSS, build_app
from annotation_app.auth import LoginThrottle
from annotation_app.io import import_candidates
from annotation_app.sessions import AnonymousPage, SessionExpiry, SessionLifetime, route_path, scope_user
from annotation_app.store import Store, StoreError

MAX_BODY_BYTES = 1_000_000
SESSION_HOURS = 12.0
HOUSEKEEPING_EVERY_S = 60.0

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, before any route runs.

    The store checks every text field's length, but a 100 MB JSON body would still be read and
    parsed by the framework first; this stops it at the door (declared or streamed length).
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ValueError(f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


async def _too_large(send, limit: int) -> None:
    body = f'{{"detail": "request body too large (limit {limit} bytes)"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# Gradio's login route calls auth(username, password) and passes it nothing else; the client's
# address reaches it through this context variable, set for each request by RequestClient.
REQUEST_CLIENT: ContextVar[str | None] = ContextVar("request_client", default=None)


class RequestClient:
    """ASGI middleware: record the request's client address in :data:`REQUEST_CLIENT`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        token = REQUEST_CLIENT.set(client[0] if client else None)
        try:
            return await self.app(scope, receive, send)
        finally:
            REQUEST_CLIENT.reset(token)


def make_auth(store: Store, throttle: LoginThrottle | None = None):
    """Gradio's ``auth`` callable: checks the store, off the event loop, through the login throttle.

    Gradio awaits an async auth function inside its login route; a plain function would run
    the KDF (tens of ms) on the event loop and stall every open connection during a login wave.
    A client that must wait gets 429 with ``Retry-After`` (RFC 6585) straight away: no password
    check, no sleeping, nothing held while it waits.
    """
    throttle = throttle or LoginThrottle()

    async def auth(username: str, password: str) -> bool:
        client = REQUEST_CLIENT.get()
        wait_s = throttle.attempt(username, client)
        if wait_s > 0:
            seconds = math.ceil(wait_s)
            raise HTTPException(
                status_code=429,
                detail=f"too many failed logins for {username!r} from your address; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
        ok = await anyio.to_thread.run_sync(store.verify_password, username, password)
        if ok:
            throttle.succeeded(username, client)
        else:
            throttle.failed(username, client)
        return ok

    return auth


def housekeeping(sessions: SessionLifetime, registry: exports.ExportRegistry, every_s: float):
    """The app's lifespan (Starlette, "Lifespan"): every ``every_s`` end expired sessions and
    delete expired exports; at shutdown delete every export and the export folder."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def sweep_forever():
            while True:
                await asyncio.sleep(every_s)
                try:
                    sessions.prune(app.tokens)
                    await anyio.to_thread.run_sync(registry.sweep)
                except Exception:  # noqa: BLE001 - keep sweeping; the next round may succeed
                    logger.exception("housekeeping failed")

        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            registry.close()

    return lifespan


class ExportDownloads:
    """ASGI middleware serving ``GET /export/<token>/<name>`` from the export registry; every other
    request passes on. The session's user must be an admin (else 401 without a login, 403) and the
    one who made the export (else 404, as for an expired or unknown token: a token is not
    confirmed to anyone else). The file goes as an attachment and is deleted once sent.
    """

    def __init__(self, app, store, registry: exports.ExportRegistry):
        self.app, self.store, self.registry = app, store, registry

    async def __call__(self, scope, receive, send):
        path = route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith(exports.ROUTE_PREFIX):
            return await self.app(scope, receive, send)
        response = await self._respond(scope, path[len(exports.ROUTE_PREFIX) :])
        await response(scope, receive, send)

    async def _respond(self, scope, rest: str):
        if scope["method"] != "GET":  # not even HEAD: the file is deleted once a response is sent
            return _refusal(405, "method_not_allowed", "a download is a GET request")
        user = scope_user(scope)
        if user is None:
            return _refusal(401, "not_logged_in", "you are not logged in; log in and export again")
        role = await anyio.to_thread.run_sync(self.store.role, user)
        if role != "admin":
            return _refusal(403, "not_admin", "this needs an admin account")
        token, _, name = rest.partition("/")
        path = self.registry.claim(token, user, name)
        if path is None:
            return _refusal(
                404, "no_such_export", "this download has expired or was already downloaded; export again"
            )
        return FileResponse(
            path,
            filename=name,  # Content-Disposition: attachment
            media_type="application/octet-stream",
            headers={"Cache-Control": "no-store"},
            background=BackgroundTask(self.registry.delete_file, token, path.name),
        )


def _refusal(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "code": code, "message": message}, status_code=status)


def launch(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    project: str | None = None,
    block: bool = True,
    quiet: bool = False,
    max_threads: int = 64,
    session_hours: float = SESSION_HOURS,
    throttle: LoginThrottle | None = None,
):
    """Build and launch the app on ``host:port`` with login against ``store``; returns (demo, url).

    A login session ends ``session_hours`` after it began; ``throttle`` slows password guessing
    (default: :class:`LoginThrottle`'s settings).
    """
    # Gradio reads these settings when the app is built and queued (and gradio_client when a
    # client is made), so they are set here, for the process that serves, rather than in every
    # process that imports this module. No phone-home:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    # Gradio's queue keeps a record of its last 10,000 events for the monitoring dashboard (off
    # here) and rebuilds a pandas summary of all of them after every event: 4-20 ms of the server's
    # one core per API call, growing with uptime. Summarise never, keep few records.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "256")
    if not session_hours > 0:
        raise StoreError(
            f"session_hours must be a number > 0, got {session_hours!r}", code="bad_session_hours"
        )
    demo = build_app(store, project=project)
    api.guard_calls(demo)
    # SQLite serialises writers anyway; a bounded pool keeps latency predictable under load.
    demo.queue(default_concurrency_limit=16, max_size=2048)
    sessions = SessionLifetime(session_hours * 3600)
    # Outermost first: the size limit before anything reads a body; a session that is over is
    # ended before the page, the export route or Gradio ask who the user is.
    middleware = [
        Middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES),
        Middleware(RequestClient),
        Middleware(SessionExpiry, sessions=sessions),
        Middleware(AnonymousPage),
        Middleware(ExportDownloads, store=store, registry=exports.REGISTRY),
    ]
    _, url, _ = demo.launch(
        css=PAGE_CSS,  # Gradio 6 takes the page's CSS at launch, not in the Blocks constructor
        server_name=host,
        server_port=port,
        auth=make_auth(store, throttle),
        auth_message="RLHF Lab annotation: log in with the account your lab admin created "
        "(`rlhf annotate users add NAME`).",
        prevent_thread_lock=not block,
        quiet=quiet,
        show_error=False,
        max_file_size="1mb",
        ssr_mode=False,
        mcp_server=False,
        max_threads=max_threads,
        enable_monitoring=False,
        app_kwargs={
            "middleware": middleware,
            "exception_handlers": api.EXCEPTION_HANDLERS,
            "lifespan": housekeeping(sessions, exports.REGISTRY, HOUSEKEEPING_EVERY_S),
        },
    )
    return demo, url


def serve(
    db: str,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    project: str | None = None,
    block: bool = True,
    quiet: bool = False,
    session_hours: float = SESSION_HOURS,
):
    """Open the store at ``db`` and serve the app (in-process entry point; ``rlhf annotate serve``)."""
    store = Store(db)
    if not store.users():
        raise StoreError(
            f"{db} has no users yet: add one with `rlhf annotate users add NAME --role admin --db {db}`",
            code="no_users",
        )
    return launch(
        store, host=host, port=port, project=project, block=block, quiet=quiet, session_hours=session_hours
    )


def serve_candidates(
    candidates: str, db: str, port: int = 7860, host: str = "127.0.0.1", *, block: bool = True
):
    """Import a candidates file into ``db`` and serve it (``rlhf quickstart --annotate``).

    When the database has no users yet, an ``admin`` account is created with a random password,
    printed once on the terminal.
    """
    store = Store(db)
    res = import_candidates(store, candidates)
    print(f"annotation: {res['added']} new prompts imported into {db} ({res['unchanged']} already there)")
    if not store.users():
        password = secrets.token_urlsafe(12)
        store.add_user("admin", password, "admin")
        print(
            f"annotation: created user 'admin' with password {password} (add annotators with "
            f"`rlhf annotate users add NAME --db {db}`)"
        )
    return launch(store, host=host, port=port, block=block)
