"""Logging in: password hashing and checking, account rules, the login throttle, the session user.

Passwords are stored as scrypt hashes (RFC 7914) with a per-user salt; the KDF's parameters are
stored with each hash, so they can be raised later without invalidating old accounts. Gradio's
login route (wired in ``app.py``) asks :meth:`Store.verify_password` through a
:class:`LoginThrottle`; after login, a handler learns who is calling only from
:func:`session_user`, never from what the page sends.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping

from annotation_app.errors import StoreError
from annotation_app.schema import ROLES
from annotation_app.validation import check_text

MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 1_024
MIN_PASSWORD_CHARS = 8

# scrypt parameters (RFC 7914 interactive-login values): ~16 MiB and a few tens of ms per check.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def hash_password(password: str, salt: bytes | None = None) -> tuple[str, str, str]:
    """``(kdf, salt_hex, hash_hex)`` for a password, with a fresh 16-byte salt unless given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, **_SCRYPT)
    kdf = "scrypt:n={n},r={r},p={p}".format(**_SCRYPT)
    return kdf, salt.hex(), digest.hex()


def check_password(password: str, kdf: str, salt_hex: str, hash_hex: str) -> bool:
    params = dict(kv.split("=") for kv in kdf.split(":", 1)[1].split(","))
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=bytes.fromhex(salt_hex),
        n=int(params["n"]),
        r=int(params["r"]),
        p=int(params["p"]),
        dklen=len(hash_hex) // 2,
    )
    return hmac.compare_digest(digest.hex(), hash_hex)


def check_new_account(username, password, role: str) -> str:
    """The user name (stripped) of an account about to be created, after checking the name's
    characters, the role and the password's length; refusals are :class:`StoreError`."""
    username = check_text(username, "username", MAX_USERNAME_CHARS, allow_empty=False).strip()
    if not all(ch.isalnum() or ch in "._-@" for ch in username):
        raise StoreError(
            f"username {username!r} may only contain letters, digits and . _ - @", code="bad_username"
        )
    if role not in ROLES:
        raise StoreError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}", code="bad_role")
    check_text(password, "password", MAX_PASSWORD_CHARS)
    if len(password) < MIN_PASSWORD_CHARS:
        raise StoreError(
            f"the password must have at least {MIN_PASSWORD_CHARS} characters", code="weak_password"
        )
    return username


def plausible_login(username, password) -> bool:
    """False for a pair no account can have (not text, or over the limits): refused unread."""
    if not isinstance(username, str) or not isinstance(password, str):
        return False
    return len(username) <= MAX_USERNAME_CHARS and len(password) <= MAX_PASSWORD_CHARS


def password_matches(password: str, stored: Mapping | None) -> bool:
    """True when ``password`` matches a stored ``kdf``/``salt``/``pw_hash`` row.

    For an unknown user (``stored`` None) the same KDF time is spent before answering False, so
    the time of a refusal does not tell which user names exist.
    """
    if stored is None:
        kdf, salt, digest = hash_password("x" * MIN_PASSWORD_CHARS, b"\0" * 16)
        check_password(password, kdf, salt, digest)
        return False
    return check_password(password, stored["kdf"], stored["salt"], stored["pw_hash"])


class LoginThrottle:
    """Refuse logins for a user name after ``max_failures`` wrong passwords within ``window_s``
    seconds, until the window has passed (Gradio's login route has no rate limit of its own).

    In memory, per process: enough to make password guessing slow, not a lockout database.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, clock=time.monotonic):
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def allowed(self, username: str) -> bool:
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(username, []) if now - t < self.window_s]
            self._failures[username] = recent
            return len(recent) < self.max_failures

    def record(self, username: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures.pop(username, None)
            else:
                self._failures.setdefault(username, []).append(self.clock())


def session_user(request) -> str:
    """The user name of a page or API request (a ``gr.Request``), from the server-side session.

    Identity comes only from the session that Gradio's login created, never from inputs the page
    sends, so nobody can act as another user by editing a request.
    """
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise StoreError("you are not logged in; reload the page and log in", code="not_logged_in")
    return name
