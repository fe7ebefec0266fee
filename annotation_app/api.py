"""The named API endpoints scripts call (``gradio_client`` with ``auth=(user, password)``), and the
check every call to the app passes first.

``/next`` → the caller's next item as a dict (``None`` fields when all is done);
``/submit`` (prompt_id, ranking, flags, comment, client_token, and optionally edit) →
``{"ok": true, "status", ..., "server_ms"}`` or ``{"ok": false, "code", "message"}``; ``/skip``
(prompt_id, client_token) likewise.
What each does is in :mod:`annotation_app.handlers` (``api_*``); this module declares them.

Malformed calls (:func:`guard_calls`, :data:`EXCEPTION_HANDLERS`): Gradio checks only that a call
has *enough* inputs, drops extra ones silently, and answers a short call, an unknown endpoint or
bad keyword arguments with ``{"error": null}`` or a bare 500 after printing a traceback. Here every
call's inputs are counted and their JSON types checked against the endpoint's own description
(what ``/gradio_api/info`` publishes) before Gradio reads them: the named endpoints answer
``{"ok": false, "code": "bad_request", "message"}``, the page's own events a plain error, and
neither prints a traceback (a malformed call is the caller's mistake, not the server's). Optional
trailing inputs (``/submit``'s ``edit``) may be left out: they take their defaults, as
``gradio_client`` would fill them in.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import gradio as gr
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from gradio.route_utils import FnIndexInferError
from gradio.utils import get_function_params
from starlette.responses import JSONResponse

from annotation_app import handlers
from annotation_app.auth import session_user
from annotation_app.handlers import Page
from annotation_app.sessions import route_path
from rlhf.errors import UserError

API_WORKERS = 4
NAMED_ENDPOINTS = ("/next", "/submit", "/skip")

logger = logging.getLogger(__name__)


class BadRequest(UserError):
    """A call with the wrong number of inputs or an input of the wrong type."""

    code = "bad_request"


def wire_api(page: Page) -> None:
    """Declare ``/next``, ``/submit`` and ``/skip`` inside the Blocks being built."""
    # The names, parameters and docstrings of these functions are the API scripts see.

    def api_next(request: gr.Request) -> dict:
        """The caller's next assigned item: prompt_id, prompt, responses {label: text}, labels,
        lease_expires_at (epoch seconds), draft, and proposal (a model's suggested ranking) only
        for an annotator who opted in on the page. ``prompt_id`` is None when nothing is left."""
        return _api_call(handlers.api_next, page, request)

    def api_submit(
        prompt_id: str,
        ranking: str,
        flags: list[str],
        comment: str,
        client_token: str,
        request: gr.Request,
        edit: str | None = None,
    ) -> dict:
        """Submit a complete ranking (e.g. "C > B = D > A") for a prompt leased to the caller.
        flags: [] or ["all_bad"]. Sending the same client_token again returns the stored result.
        edit (optional): your corrected version of the response ranked first, which must be ranked
        first alone; an edit equal to that response, or blank, stores no edit."""
        return _api_call(
            handlers.api_submit, page, request, prompt_id, ranking, flags, comment, client_token, edit
        )

    def api_skip(prompt_id: str, client_token: str, request: gr.Request) -> dict:
        """Skip a prompt leased to the caller (it is not offered to them again)."""
        return _api_call(handlers.api_skip, page, request, prompt_id, client_token)

    # SQLite runs one writer at a time anyway; a few workers keep the queue moving without
    # dozens of threads fighting over the GIL and the write lock (API_WORKERS, shared).
    api = {"concurrency_limit": API_WORKERS, "concurrency_id": "store-api"}
    for fn, name in ((api_next, "next"), (api_submit, "submit"), (api_skip, "skip")):
        fn.answers_bad_requests = True  # guard_calls lets it answer a malformed call itself
        gr.api(fn, api_name=name, **api)


def _api_call(handler: Callable[..., dict], page: Page, request: gr.Request, *inputs) -> dict:
    # The API answers every refusal as {"ok": false, ...}: a malformed call, a request without a
    # session, anything the store refuses.
    problem = _MALFORMED.get()
    if problem is not None:
        return handlers.refusal(BadRequest(problem))
    try:
        user = session_user(request)
    except UserError as err:
        return handlers.refusal(err)
    return handler(page, user, *inputs)


# ----------------------------------------------------------------------------- malformed calls

# What guard_calls found wrong with the call being run (None: nothing), for the named endpoints to
# answer. Set before every call; Gradio runs the endpoint in a worker thread that gets a copy of
# this context (anyio.to_thread.run_sync), and each call has its own task, so no value outlives it.
_MALFORMED: ContextVar[str | None] = ContextVar("malformed_call", default=None)


def guard_calls(demo: gr.Blocks) -> None:
    """Check the inputs of every call to ``demo``'s events before Gradio reads them.

    Wraps ``demo.preprocess_data``, the step every call's inputs pass through first (queue,
    ``/call``, ``/run``). A named endpoint with bad inputs still runs and answers ``bad_request``
    (it reads the problem from :data:`_MALFORMED`); a page event is refused with a ``gr.Error``
    that prints no traceback. A value a component refuses (a choice that is not offered) is
    refused the same quiet way.
    """
    preprocess = demo.preprocess_data

    async def preprocess_data(block_fn, inputs, state, explicit_call=False):
        problem = malformed_call(block_fn, inputs)
        _MALFORMED.set(problem)
        if problem is None:
            try:
                return await preprocess(block_fn, with_defaults(block_fn, inputs), state, explicit_call)
            except gr.Error as err:
                err.print_exception = False  # the caller's mistake: its message is the answer
                raise
        logger.info("refused a malformed call: %s", problem)
        if getattr(block_fn.fn, "answers_bad_requests", False):
            return [None] * len(block_fn.inputs)
        raise gr.Error(f"Bad request: {problem}", print_exception=False)

    demo.preprocess_data = preprocess_data


def malformed_call(block_fn, inputs: list) -> str | None:
    """What is wrong with a call's ``inputs`` (one line), or None: their number, then each one's
    JSON type against the input's API description (``null`` passes, as in Gradio)."""
    sig = _described(block_fn)
    if not sig.required <= len(inputs) <= len(sig.params):
        return f"{sig.name} takes {sig.takes()}, got {len(inputs)}"
    for param, schema, value in zip(sig.params, sig.schemas, inputs, strict=False):
        if not _fits(value, schema):
            return f"{sig.name}: {param} must be {_describe(schema)}, got {_kind(value)}"
    return None


def with_defaults(block_fn, inputs: list) -> list:
    """``inputs`` with the optional trailing ones the call left out set to their defaults."""
    return [*inputs, *_described(block_fn).defaults[len(inputs) :]]


@dataclass(frozen=True)
class _Signature:
    """What a call to one event must send: its inputs' names and JSON schemas, how many of the
    first ones are required, and every input's default (used only for the optional ones)."""

    name: str
    params: list[str]
    schemas: list[dict]
    required: int
    defaults: list[Any]

    def takes(self) -> str:
        optional = self.params[self.required :]
        listed = ", ".join(self.params[: self.required]) + "".join(f"[, {p}]" for p in optional)
        count = f"{self.required} to {len(self.params)}" if optional else str(self.required)
        return f"{count} inputs" + (f" ({listed})" if self.params else "")


@functools.cache
def _described(block_fn) -> _Signature:
    """An event's name for messages and its inputs' names, JSON schemas and defaults (computed
    once: reading a signature and the components' API descriptions costs ~0.1 ms)."""
    name = f"/{block_fn.api_name}" if block_fn.api_visibility == "public" else block_fn.name
    schemas = [_nullable(block.api_info()) if hasattr(block, "api_info") else {} for block in block_fn.inputs]
    fn_params = get_function_params(block_fn.fn) if block_fn.fn else []
    if len(fn_params) != len(block_fn.inputs):  # parameters that do not name the inputs: all required
        params = [f"input {i + 1}" for i in range(len(block_fn.inputs))]
        return _Signature(name, params, schemas, len(params), [None] * len(params))
    # (name, has_default, default, type hint) per input; required: up to the last without a default
    required = max((i + 1 for i, param in enumerate(fn_params) if not param[1]), default=0)
    return _Signature(name, [p[0] for p in fn_params], schemas, required, [p[2] for p in fn_params])


def _nullable(schema: dict) -> dict:
    """The one type a ``str | None`` input's ``oneOf: [null, string]`` allows besides ``null``
    (which every input accepts); any other schema as it is."""
    options = schema.get("oneOf") or schema.get("anyOf") or []
    typed = [o for o in options if o.get("type") != "null"]
    return typed[0] if len(typed) == 1 and len(options) == 2 else schema


_JSON_TYPES = {
    "string": (str, "a string"),
    "boolean": (bool, "true or false"),
    "integer": (int, "a whole number"),
    "number": ((int, float), "a number"),
    "array": (list, "a list"),
    "object": (dict, "an object"),
}


def _fits(value, schema: dict) -> bool:
    kind = schema.get("type")
    if value is None or kind not in _JSON_TYPES:
        return True  # null, or a type this check does not know: Gradio's components decide
    if isinstance(value, bool) and kind != "boolean":
        return False  # JSON true is not the number 1
    if not isinstance(value, _JSON_TYPES[kind][0]):
        return False
    items = schema.get("items")
    return kind != "array" or not isinstance(items, dict) or all(_fits(v, items) for v in value)


def _describe(schema: dict) -> str:
    items = schema.get("items")
    if schema["type"] == "array" and isinstance(items, dict) and items.get("type") in _PLURALS:
        return f"a list of {_PLURALS[items['type']]}"
    return _JSON_TYPES[schema["type"]][1]


_PLURALS = {"string": "strings", "boolean": "booleans", "integer": "whole numbers", "number": "numbers"}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    for types, described in _JSON_TYPES.values():
        if isinstance(value, types):
            return described
    return type(value).__name__


# Calls that fail in Gradio's routes before any event runs: a body of the wrong shape, an unknown
# endpoint name, an unknown event number (fn_index), keyword arguments that do not match
# (/call/v2). FastAPI exception handlers (FastAPI, "Handling Errors") turn them into one-line
# answers; elsewhere a body of the wrong shape gets FastAPI's usual 422, and the other exceptions
# are re-raised, so a real bug still shows its traceback.
_CALL_ROUTES = re.compile(r"^/gradio_api/(queue/join|call/|run/|api/)")


async def _malformed_route_call(request, exc: Exception):
    if not _CALL_ROUTES.match(route_path(request.scope)):
        if isinstance(exc, RequestValidationError):
            return await request_validation_exception_handler(request, exc)
        raise exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        message = f"{where}: {first.get('msg', 'malformed request body')}"
        status = 422
    elif isinstance(exc, FnIndexInferError):
        message = f"no such API endpoint; the named endpoints are {', '.join(NAMED_ENDPOINTS)}"
        status = 404
    elif isinstance(exc, KeyError):
        message = f"no such event: {exc}; the named endpoints are {', '.join(NAMED_ENDPOINTS)}"
        status = 404
    else:
        message = str(exc).splitlines()[0] if str(exc) else "malformed call"
        status = 400
    logger.info("refused a malformed call to %s: %s", request.url.path, message)
    return JSONResponse({"ok": False, "code": "bad_request", "message": message}, status_code=status)


EXCEPTION_HANDLERS = {
    exc: _malformed_route_call for exc in (RequestValidationError, FnIndexInferError, KeyError, TypeError)
}
