"""The named API endpoints scripts call (``gradio_client`` with ``auth=(user, password)``).

``/next`` → the caller's next item as a dict (``None`` fields when all is done);
``/submit`` (prompt_id, ranking, flags, comment, client_token) → ``{"ok": true, "status", ...,
"server_ms"}`` or ``{"ok": false, "code", "message"}``; ``/skip`` (prompt_id, client_token) likewise.
What each does is in :mod:`annotation_app.handlers` (``api_*``); this module only declares them.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from annotation_app import handlers
from annotation_app.auth import session_user
from annotation_app.handlers import Page
from rlhf.errors import UserError

API_WORKERS = 4


def wire_api(page: Page) -> None:
    """Declare ``/next``, ``/submit`` and ``/skip`` inside the Blocks being built."""
    # The names, parameters and docstrings of these functions are the API scripts see.

    def api_next(request: gr.Request) -> dict:
        """The caller's next assigned item: prompt_id, prompt, responses {label: text}, labels,
        lease_expires_at (epoch seconds), draft. ``prompt_id`` is None when nothing is left."""
        return _api_call(handlers.api_next, page, request)

    def api_submit(
        prompt_id: str,
        ranking: str,
        flags: list[str],
        comment: str,
        client_token: str,
        request: gr.Request,
    ) -> dict:
        """Submit a complete ranking (e.g. "C > B = D > A") for a prompt leased to the caller.
        flags: [] or ["all_bad"]. Sending the same client_token again returns the stored result."""
        return _api_call(handlers.api_submit, page, request, prompt_id, ranking, flags, comment, client_token)

    def api_skip(prompt_id: str, client_token: str, request: gr.Request) -> dict:
        """Skip a prompt leased to the caller (it is not offered to them again)."""
        return _api_call(handlers.api_skip, page, request, prompt_id, client_token)

    # SQLite runs one writer at a time anyway; a few workers keep the queue moving without
    # dozens of threads fighting over the GIL and the write lock (API_WORKERS, shared).
    api = {"concurrency_limit": API_WORKERS, "concurrency_id": "store-api"}
    gr.api(api_next, api_name="next", **api)
    gr.api(api_submit, api_name="submit", **api)
    gr.api(api_skip, api_name="skip", **api)


def _api_call(handler: Callable[..., dict], page: Page, request: gr.Request, *inputs) -> dict:
    # The API answers every refusal as {"ok": false, ...}, a request without a session included.
    try:
        user = session_user(request)
    except UserError as err:
        return handlers.refusal(err)
    return handler(page, user, *inputs)
