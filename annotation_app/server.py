"""Serving the annotation app: login, request limits, launch (Gradio's server under uvicorn).

:func:`launch` builds the page (:mod:`annotation_app.app`) and serves it with login against the
store; :func:`serve` and :func:`serve_candidates` are the ``rlhf annotate serve`` and
``rlhf quickstart --annotate`` entry points.
"""

from __future__ import annotations

import os
import secrets

import anyio
from starlette.middleware import Middleware

from annotation_app.app import build_app
from annotation_app.auth import LoginThrottle
from annotation_app.io import import_candidates
from annotation_app.store import Store, StoreError

MAX_BODY_BYTES = 1_000_000


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


def make_auth(store: Store, throttle: LoginThrottle | None = None):
    """Gradio's ``auth`` callable: checks the store, off the event loop, with a failure throttle.

    Gradio awaits an async auth function inside its login route; a plain function would run
    the KDF (tens of ms) on the event loop and stall every open connection during a login wave.
    """
    throttle = throttle or LoginThrottle()

    async def auth(username: str, password: str) -> bool:
        if not throttle.allowed(username):
            return False
        ok = await anyio.to_thread.run_sync(store.verify_password, username, password)
        throttle.record(username, ok)
        return ok

    return auth


def launch(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    project: str | None = None,
    block: bool = True,
    quiet: bool = False,
    max_threads: int = 64,
):
    """Build and launch the app on ``host:port`` with login against ``store``; returns (demo, url)."""
    # Gradio reads these settings when the app is built and queued (and gradio_client when a
    # client is made), so they are set here, for the process that serves, rather than in every
    # process that imports this module. No phone-home:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    # Gradio's queue keeps a record of its last 10,000 events for the monitoring dashboard (off
    # here) and rebuilds a pandas summary of all of them after every event: 4-20 ms of the server's
    # one core per API call, growing with uptime. Summarise never, keep few records.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "256")
    demo = build_app(store, project=project)
    # SQLite serialises writers anyway; a bounded pool keeps latency predictable under load.
    demo.queue(default_concurrency_limit=16, max_size=2048)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        auth=make_auth(store),
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
        app_kwargs={"middleware": [Middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)]},
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
):
    """Open the store at ``db`` and serve the app (in-process entry point; ``rlhf annotate serve``)."""
    store = Store(db)
    if not store.users():
        raise StoreError(
            f"{db} has no users yet: add one with `rlhf annotate users add NAME --role admin --db {db}`",
            code="no_users",
        )
    return launch(store, host=host, port=port, project=project, block=block, quiet=quiet)


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
