"""Logging in: password hashing and checking, account rules, the login throttle, the session user.

Passwords are stored as scrypt hashes (RFC 7914) with a per-user salt; the KDF's parameters are
stored with each hash, so they can be raised later without invalidating old accounts. Gradio's
login route (wired in :mod:`annotation_app.server`) asks :meth:`Store.verify_password` through a
:class:`LoginThrottle`, which slows guessing per (user name, client); after login, a handler
learns who is calling only from :func:`session_user`, never from what the page sends.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
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
    """Slow down password guessing per (user name, client), never lock an account for everyone.

    After ``free_failures`` wrong passwords for a name from one client, that client must wait
    before its next try for that name: ``base_delay_s``, then twice as long after each further
    failure, at most ``max_delay_s`` (exponential backoff). A client that fails for many names
    (``client_free_failures`` failures, whatever the names) waits the same way before any try.
    The real user, logging in from another client, is never slowed by someone else's guesses
    (OWASP Authentication Cheat Sheet, "Protect against automated attacks": throttle rather than
    lock accounts, or an attacker can lock anyone out).

    :meth:`attempt` answers how long to wait. A try during the wait is refused at once, without
    checking the password: no KDF time, no thread held, so hammering the login costs the server
    next to nothing, and it does not count. A try that goes ahead counts as a failure of its
    (name, client) straight away, so a burst of parallel guesses at one name cannot all slip
    through before the first result comes back; :meth:`succeeded` clears that record. The
    client-wide count grows only with failures that happened (:meth:`failed`): a wave of
    annotators logging in at once from one address (a lab behind one NAT or proxy) must not be
    refused for being many. The client's own record is only forgotten ``forget_s`` after its last
    failure (otherwise a guesser with one valid account could reset it). Clients are keyed by
    address (:func:`client_key`).

    In memory, per process (Gradio's login sessions are per process too); the table is bounded
    by dropping the oldest records past ``max_records``.
    """

    def __init__(
        self,
        *,
        free_failures: int = 3,
        client_free_failures: int = 20,
        base_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        forget_s: float = 900.0,
        max_records: int = 100_000,
        clock=time.monotonic,
    ):
        self.free_failures, self.client_free_failures = free_failures, client_free_failures
        self.base_delay_s, self.max_delay_s, self.forget_s = base_delay_s, max_delay_s, forget_s
        self.max_records, self.clock = max_records, clock
        # key -> (failures, time of the last one); key (name, client) or (None, client): any name
        self._failures: dict[tuple[str | None, str], tuple[int, float]] = {}
        self._lock = threading.Lock()

    def attempt(self, username: str, client: str | None) -> float:
        """Seconds before ``client`` may try ``username`` (then nothing is counted), or 0: go
        ahead, the try counts as a failure of (name, client) until :meth:`succeeded` says otherwise."""
        now, network = self.clock(), client_key(client)
        keys = ((username, network), (None, network))
        with self._lock:
            wait = max(
                self._wait(self._failures.get(keys[0]), self.free_failures, now),
                self._wait(self._failures.get(keys[1]), self.client_free_failures, now),
            )
            if wait > 0:
                return wait
            self._count(keys[0], now)
            return 0.0

    def failed(self, username: str, client: str | None) -> None:
        """The try was a wrong password: it counts for the client, whatever the name."""
        with self._lock:
            self._count((None, client_key(client)), self.clock())

    def succeeded(self, username: str, client: str | None) -> None:
        """The try was the right password: clear its (name, client) record."""
        with self._lock:
            self._failures.pop((username, client_key(client)), None)

    def _count(self, key: tuple[str | None, str], now: float) -> None:
        failures, last = self._failures.pop(key, (0, now))
        fresh = now - last >= self.forget_s
        self._failures[key] = (1 if fresh else failures + 1, now)  # re-inserted: newest last
        while len(self._failures) > self.max_records:
            del self._failures[next(iter(self._failures))]  # the oldest failure goes first

    def _wait(self, record: tuple[int, float] | None, free: int, now: float) -> float:
        if record is None:
            return 0.0
        failures, last = record
        if failures < free or now - last >= self.forget_s:
            return 0.0
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (failures - free))
        return max(0.0, last + delay - now)


def client_key(address: str | None) -> str:
    """The throttle's key for a client address: IPv4 as is, IPv6 as its /64 network (one host
    commonly holds a whole /64 and can rotate through it freely)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a test client's name, a Unix socket): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:1.2.3.4 is the IPv4 client 1.2.3.4
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def session_user(request) -> str:
    """The user name of a page or API request (a ``gr.Request``), from the server-side session.

    Identity comes only from the session that Gradio's login created, never from inputs the page
    sends, so nobody can act as another user by editing a request.
    """
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise StoreError("you are not logged in; reload the page and log in", code="not_logged_in")
    return name
