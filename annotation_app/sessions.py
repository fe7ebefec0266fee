"""Login sessions around Gradio's: who a request is from, when a session ends, what anonymous
visitors see.

Gradio's login route gives the browser a random token in a cookie (``access-token-<cookie_id>``,
and an ``-unsecure-`` twin for plain HTTP) and keeps ``app.tokens``: token → user name. Every
Gradio route asks that table, so removing a token there logs that session out everywhere. This
module reads the same cookie and table (as ``gradio.routes``' ``get_current_user`` does), so our
own routes share Gradio's login, and adds what Gradio lacks:

* :class:`SessionLifetime` and the :class:`SessionExpiry` middleware: a session ends
  ``lifetime_s`` after its login (Gradio's lives as long as the server; OWASP Session Management
  Cheat Sheet, "Session Expiration");
* the :class:`AnonymousPage` middleware: the login page that anonymous visitors get carries no
  description of the API (Gradio embeds it in every page, login page included).

Pure ASGI middleware (Starlette, "Pure ASGI Middleware"): they see every request before Gradio's
routes, and ``scope["app"]`` is Gradio's FastAPI app.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import MutableMapping

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

LOGIN_PATHS = ("/login", "/login/")


def route_path(scope) -> str:
    """The request's path inside the app (without the proxy prefix ``root_path``, if any)."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root) :] if root and path.startswith(root) else path


def session_token(scope) -> str | None:
    """The login token of a request's cookie (``None`` without one)."""
    cookie_id = getattr(scope.get("app"), "cookie_id", None)
    header = Headers(scope=scope).get("cookie")
    if cookie_id is None or not header:
        return None
    cookies = cookie_parser(header)
    return cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")


def scope_user(scope) -> str | None:
    """The logged-in user of a request, as Gradio sees it (``None``: anonymous)."""
    token = session_token(scope)
    tokens = getattr(scope.get("app"), "tokens", None)
    return tokens.get(token) if token is not None and tokens is not None else None


class SessionLifetime:
    """The login time of every session token, and the rule that ends a session ``lifetime_s``
    after it. A token whose login time is unknown counts as expired (fail closed)."""

    def __init__(self, lifetime_s: float, clock=time.monotonic):
        self.lifetime_s, self.clock = lifetime_s, clock
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def stamp_new(self, tokens: MutableMapping[str, str]) -> None:
        """Record now as the login time of every token in ``tokens`` not seen before."""
        now = self.clock()
        with self._lock:
            for token in list(tokens):
                self._started.setdefault(token, now)

    def expired(self, token: str) -> bool:
        with self._lock:
            started = self._started.get(token)
        return started is None or self.clock() - started >= self.lifetime_s

    def end_if_expired(self, tokens: MutableMapping[str, str], token: str | None) -> None:
        """Remove ``token`` from Gradio's table when its session is over: the request is anonymous."""
        if token is not None and token in tokens and self.expired(token):
            tokens.pop(token, None)
            with self._lock:
                self._started.pop(token, None)

    def prune(self, tokens: MutableMapping[str, str]) -> None:
        """End every expired session and forget tokens Gradio no longer has (logged out)."""
        for token in list(tokens):
            self.end_if_expired(tokens, token)
        with self._lock:
            for token in [t for t in self._started if t not in tokens]:
                del self._started[token]


class SessionExpiry:
    """ASGI middleware: stamp each new login, and treat a request whose session is over as anonymous.

    The login time is taken when the login response starts (Gradio has put the new token in
    ``app.tokens`` by then), before the browser can use the cookie.
    """

    def __init__(self, app, sessions: SessionLifetime):
        self.app, self.sessions = app, sessions

    async def __call__(self, scope, receive, send):
        tokens = getattr(scope.get("app"), "tokens", None)
        if scope["type"] not in ("http", "websocket") or tokens is None:
            return await self.app(scope, receive, send)
        self.sessions.end_if_expired(tokens, session_token(scope))
        if scope["type"] == "http" and route_path(scope) in LOGIN_PATHS:

            async def send_after_stamping(message):
                if message["type"] == "http.response.start":
                    self.sessions.stamp_new(tokens)
                await send(message)

            return await self.app(scope, receive, send_after_stamping)
        return await self.app(scope, receive, send)


# Gradio's page template puts the API description in the HTML as
# `<script>window.gradio_api_info = {...};</script>`; its JSON escapes "<", so the first ";</script>"
# ends it. An anonymous visitor gets an empty description instead (the page's script reads it
# to build the client; empty, the login form works the same).
_API_INFO = re.compile(rb"(window\.gradio_api_info\s*=\s*).*?(;\s*</script>)", re.DOTALL)
_EMPTY_API_INFO = rb'\1{"named_endpoints": {}, "unnamed_endpoints": {}}\2'


class AnonymousPage:
    """ASGI middleware: an HTML page sent to an anonymous visitor (the login page) carries no API
    description. Gradio's ``/gradio_api/info`` answers 401 without a login, but its page template
    embeds the same description (every endpoint, its parameters, code snippets) in every page.

    Only HTML responses to anonymous GET requests are read and rewritten; the rest (scripts,
    styles, everything a logged-in user gets) passes through untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope_user(scope) is not None:
            return await self.app(scope, receive, send)
        start: dict | None = None
        body = bytearray()

        async def rewrite_html(message):
            nonlocal start
            if message["type"] == "http.response.start":
                if not Headers(raw=message["headers"]).get("content-type", "").startswith("text/html"):
                    return await send(message)
                start = message  # held back until the whole page is here
                return None
            if start is None:
                return await send(message)
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return None
            page = _API_INFO.sub(_EMPTY_API_INFO, bytes(body))
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page})
            return None

        return await self.app(scope, receive, rewrite_html)
