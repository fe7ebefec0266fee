"""The annotation store: users, prompts, leases, rankings and an audit log in one SQLite file.

No Gradio here: the page, the scripted API and the command line all go through :class:`Store`,
so validation, assignment and idempotency are written (and tested) once.

Durability and concurrency (docs/environment.md, "SQLite under concurrent writers"):

* WAL journal, ``busy_timeout``, ``synchronous=FULL`` (an acknowledged submit survives a crash
  or power loss);
* ``isolation_level=None`` and an explicit ``BEGIN IMMEDIATE … COMMIT`` around every
  transaction that may write: a deferred transaction that reads and then writes fails at once
  with "database is locked" under contention, whatever the busy timeout;
* one connection per thread (Gradio runs handlers on a thread pool).

The SQL is kept portable (``ON CONFLICT``, no SQLite-only functions in queries, timestamps as
epoch seconds in REAL columns) so PostgreSQL can replace SQLite later; the SQLite-specific parts
are the PRAGMAs in :meth:`Store._connect` and ``INTEGER PRIMARY KEY`` row ids.

Assignment (Argilla's per-record quorum, Label Studio's task locks):

* a prompt needs ``quorum`` submitted rankings from distinct annotators (per project);
* ``next_item`` returns the caller's live lease if they have one, otherwise leases the prompt
  with the fewest (submitted + live-leased) rankings that the caller has not submitted or
  skipped and that still has a free slot — a prompt where the caller has a draft comes first;
* a lease expires after ``lease_seconds``; expired leases stop counting against the quorum, so
  the prompt returns to the pool; saving a draft renews the caller's lease;
* a submit needs a live lease held by the caller, and a (prompt, annotator) pair has one
  ranking row (``UNIQUE``), so nobody ranks a prompt twice; later changes go through
  :meth:`Store.revise`, which keeps the old value in the audit log;
* submits are idempotent on a client token: sending the same token again (a double click, a
  retry after a lost reply) returns the stored result and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import UserError

ROLES = ("annotator", "admin")
STATUSES = ("draft", "submitted", "skipped")
FLAGS = ("all_bad",)
DEFAULT_PROJECT = "default"
DEFAULT_QUORUM = 3
DEFAULT_LEASE_SECONDS = 30 * 60

# Server-side size limits: everything a client sends is checked against these.
MAX_RANKING_CHARS = 200
MAX_COMMENT_CHARS = 5_000
MAX_TOKEN_CHARS = 100
MAX_USERNAME_CHARS = 64
MAX_PASSWORD_CHARS = 1_024
MIN_PASSWORD_CHARS = 8
MAX_PROMPT_ID_CHARS = 256

# scrypt parameters (RFC 7914 interactive-login values): ~16 MiB and a few tens of ms per check.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


class StoreError(UserError):
    """A request the store refuses (unknown prompt, expired lease, bad ranking, ...)."""

    code = "store"


# ----------------------------------------------------------------------------- schema


def _run(conn: sqlite3.Connection, statements: list[str]) -> None:
    # One statement at a time: ``executescript`` would COMMIT the surrounding BEGIN IMMEDIATE.
    for stmt in statements:
        conn.execute(stmt)


def _v1(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            """CREATE TABLE annotators (
            username   TEXT PRIMARY KEY,
            role       TEXT NOT NULL CHECK (role IN ('annotator', 'admin')),
            kdf        TEXT NOT NULL,
            salt       TEXT NOT NULL,
            pw_hash    TEXT NOT NULL,
            created_at REAL NOT NULL)""",
            """CREATE TABLE projects (
            project_id TEXT PRIMARY KEY,
            quorum     INTEGER NOT NULL CHECK (quorum >= 1),
            guidelines TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL)""",
            """CREATE TABLE prompts (
            prompt_id    TEXT PRIMARY KEY,
            project_id   TEXT NOT NULL REFERENCES projects (project_id),
            seq          INTEGER NOT NULL,
            prompt_json  TEXT NOT NULL,
            prompt_text  TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            created_at   REAL NOT NULL)""",
            """CREATE TABLE candidates (
            prompt_id TEXT NOT NULL REFERENCES prompts (prompt_id),
            label     TEXT NOT NULL,
            text      TEXT NOT NULL,
            model     TEXT NOT NULL DEFAULT '',
            gen_json  TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (prompt_id, label))""",
            """CREATE TABLE assignments (
            prompt_id  TEXT NOT NULL REFERENCES prompts (prompt_id),
            username   TEXT NOT NULL REFERENCES annotators (username),
            leased_at  REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (prompt_id, username))""",
            """CREATE TABLE rankings (
            ranking_id   INTEGER PRIMARY KEY,
            prompt_id    TEXT NOT NULL REFERENCES prompts (prompt_id),
            username     TEXT NOT NULL REFERENCES annotators (username),
            status       TEXT NOT NULL CHECK (status IN ('draft', 'submitted', 'skipped')),
            ranking      TEXT NOT NULL DEFAULT '',
            tiers_json   TEXT NOT NULL DEFAULT '[]',
            flags_json   TEXT NOT NULL DEFAULT '[]',
            comment      TEXT NOT NULL DEFAULT '',
            client_token TEXT,
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL,
            UNIQUE (prompt_id, username))""",
            """CREATE TABLE audit_log (
            entry_id  INTEGER PRIMARY KEY,
            at        REAL NOT NULL,
            username  TEXT,
            action    TEXT NOT NULL,
            prompt_id TEXT,
            detail    TEXT NOT NULL DEFAULT '{}')""",
            "CREATE INDEX prompts_by_project ON prompts (project_id, seq)",
            "CREATE INDEX rankings_by_user ON rankings (username, status)",
        ],
    )


def _v2(conn: sqlite3.Connection) -> None:
    # v2: per-project lease length, time spent per item, revision counter, and an append-only
    # audit log enforced by the database itself (PostgreSQL: the same with a rule or trigger).
    _run(
        conn,
        [
            f"ALTER TABLE projects ADD COLUMN lease_seconds INTEGER NOT NULL DEFAULT {DEFAULT_LEASE_SECONDS}",
            "ALTER TABLE rankings ADD COLUMN time_spent REAL",
            "ALTER TABLE rankings ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE rankings ADD COLUMN submitted_at REAL",
            "UPDATE rankings SET submitted_at = updated_at WHERE status = 'submitted'",
            """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
            BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
            """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
            BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
            "CREATE INDEX assignments_by_user ON assignments (username, expires_at)",
        ],
    )


def _v3(conn: sqlite3.Connection) -> None:
    # v3: a per-prompt count of submitted rankings, kept by submit(), with an index in the order
    # next_item() wants, so choosing the next prompt reads a handful of rows instead of counting
    # rankings for every prompt inside the write lock (measured: 12 ms per call at 2000 prompts).
    _run(
        conn,
        [
            "ALTER TABLE prompts ADD COLUMN n_submitted INTEGER NOT NULL DEFAULT 0",
            "UPDATE prompts SET n_submitted = (SELECT COUNT(*) FROM rankings r WHERE r.prompt_id = prompts.prompt_id "
            "AND r.status = 'submitted')",
            "CREATE INDEX prompts_by_need ON prompts (n_submitted, seq)",
        ],
    )


# Append-only list: (version, migration). Never edit a released step; add a new one.
MIGRATIONS: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [(1, _v1), (2, _v2), (3, _v3)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


# ----------------------------------------------------------------------------- passwords


def hash_password(password: str, salt: bytes | None = None) -> tuple[str, str, str]:
    """``(kdf, salt_hex, hash_hex)`` for a password, with a fresh 16-byte salt unless given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, **_SCRYPT)
    kdf = "scrypt:n={n},r={r},p={p}".format(**_SCRYPT)
    return kdf, salt.hex(), digest.hex()


def _check_password(password: str, kdf: str, salt_hex: str, hash_hex: str) -> bool:
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


# ----------------------------------------------------------------------------- records


@dataclass
class Item:
    """One leased prompt as an annotator sees it."""

    prompt_id: str
    project: str
    prompt: str
    candidates: list[dict]  # [{"label": "A", "text": ...}, ...] in display order
    lease_expires_at: float
    guidelines: str = ""
    draft: dict | None = None  # {"ranking", "flags", "comment"} of the caller's saved draft

    @property
    def labels(self) -> list[str]:
        return [c["label"] for c in self.candidates]

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "project": self.project,
            "prompt": self.prompt,
            "responses": {c["label"]: c["text"] for c in self.candidates},
            "labels": self.labels,
            "lease_expires_at": self.lease_expires_at,
            "draft": self.draft,
        }


@dataclass
class SubmitResult:
    prompt_id: str
    status: str  # submitted | skipped
    ranking: str
    flags: list[str] = field(default_factory=list)
    duplicate: bool = False  # True when this client token had already been stored
    revision: int = 0

    def to_dict(self) -> dict:
        return {
            "ok": True,
            "prompt_id": self.prompt_id,
            "status": self.status,
            "ranking": self.ranking,
            "flags": list(self.flags),
            "duplicate": self.duplicate,
            "revision": self.revision,
        }


def _check_text(value, what: str, limit: int, *, allow_empty: bool = True) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise StoreError(f"{what} must be text, got {type(value).__name__}", code="bad_input")
    if len(value) > limit:
        raise StoreError(f"{what} is {len(value)} characters long; the limit is {limit}", code="too_long")
    if not allow_empty and not value.strip():
        raise StoreError(f"{what} is empty", code="bad_input")
    return value


def check_flags(flags: Iterable[str] | None) -> list[str]:
    """Normalise flags (``all-bad`` == ``all_bad``); unknown flags raise ``bad_flag``."""
    out: list[str] = []
    for flag in flags or []:
        if not isinstance(flag, str):
            raise StoreError(f"flags must be text, got {flag!r}", code="bad_flag")
        name = flag.strip().lower().replace("-", "_")
        if name not in FLAGS:
            raise StoreError(f"unknown flag {flag!r}; valid flags: {', '.join(FLAGS)}", code="bad_flag")
        if name not in out:
            out.append(name)
    return out


def parse_for_submit(ranking_text: str, labels: list[str], flags: list[str]):
    """The complete :class:`rlhf.rankings.Ranking` of a submit (raises ``RankingError``).

    With the ``all_bad`` flag an empty ranking means "no preference": every label tied.
    """
    from rlhf.rankings import Ranking, parse_ranking

    if "all_bad" in flags and not ranking_text.strip():
        return Ranking.from_tiers([tuple(labels)], labels)
    return parse_ranking(ranking_text, labels, complete=True)


# ----------------------------------------------------------------------------- the store


class Store:
    """All reads and writes of the annotation database (thread-safe: a connection per thread)."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout_ms: int = 30_000, clock=time.time):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self._local = threading.local()
        self._all_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.migrate()

    # -- connections and transactions

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all_conns.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all_conns:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # closed from its own thread already
                    pass
            self._all_conns.clear()
        self._local = threading.local()

    @contextmanager
    def write(self):
        """``BEGIN IMMEDIATE … COMMIT`` (rolled back on any exception)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _audit(self, conn, username: str | None, action: str, prompt_id: str | None, **detail) -> None:
        conn.execute(
            "INSERT INTO audit_log (at, username, action, prompt_id, detail) VALUES (?, ?, ?, ?, ?)",
            (self.clock(), username, action, prompt_id, json.dumps(detail, sort_keys=True)),
        )

    # -- schema

    def schema_version(self) -> int:
        conn = self.conn
        has = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if not has:
            return 0
        row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
        return int(row["v"] or 0)

    def migrate(self) -> int:
        """Bring the database to :data:`SCHEMA_VERSION`, one transaction per step; return it."""
        with self.write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)"
            )
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this program's {SCHEMA_VERSION}; "
                "upgrade rlhf-lab",
                code="schema_too_new",
            )
        for version, step in MIGRATIONS:
            if version <= current:
                continue
            with self.write() as conn:
                # Re-check inside the lock: another process may have migrated meanwhile.
                row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
                if int(row["v"] or 0) >= version:
                    continue
                step(conn)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, self.clock())
                )
                self._audit(conn, None, "migrate", None, version=version)
        return self.schema_version()

    def integrity_check(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

    # -- users

    def add_user(
        self, username: str, password: str, role: str = "annotator", *, replace: bool = False
    ) -> None:
        username = _check_text(username, "username", MAX_USERNAME_CHARS, allow_empty=False).strip()
        if not all(ch.isalnum() or ch in "._-@" for ch in username):
            raise StoreError(
                f"username {username!r} may only contain letters, digits and . _ - @", code="bad_username"
            )
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}", code="bad_role")
        _check_text(password, "password", MAX_PASSWORD_CHARS)
        if len(password) < MIN_PASSWORD_CHARS:
            raise StoreError(
                f"the password must have at least {MIN_PASSWORD_CHARS} characters", code="weak_password"
            )
        kdf, salt, digest = hash_password(password)
        with self.write() as conn:
            exists = conn.execute("SELECT 1 FROM annotators WHERE username = ?", (username,)).fetchone()
            if exists and not replace:
                raise StoreError(
                    f"user {username!r} already exists (use --replace to reset it)", code="duplicate_user"
                )
            conn.execute(
                "INSERT INTO annotators (username, role, kdf, salt, pw_hash, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (username) DO UPDATE SET role = excluded.role, kdf = excluded.kdf, "
                "salt = excluded.salt, pw_hash = excluded.pw_hash",
                (username, role, kdf, salt, digest, self.clock()),
            )
            self._audit(
                conn, None, "user_add" if not exists else "user_replace", None, user=username, role=role
            )

    def verify_password(self, username: str, password: str) -> bool:
        """True when the pair is valid. Spends the same KDF time for unknown users (no user probing)."""
        if not isinstance(username, str) or not isinstance(password, str):
            return False
        if len(username) > MAX_USERNAME_CHARS or len(password) > MAX_PASSWORD_CHARS:
            return False
        row = self.conn.execute(
            "SELECT kdf, salt, pw_hash FROM annotators WHERE username = ?", (username,)
        ).fetchone()
        if row is None:
            kdf, salt, digest = hash_password("x" * MIN_PASSWORD_CHARS, b"\0" * 16)
            _check_password(password, kdf, salt, digest)
            return False
        return _check_password(password, row["kdf"], row["salt"], row["pw_hash"])

    def role(self, username: str | None) -> str | None:
        if not username:
            return None
        row = self.conn.execute("SELECT role FROM annotators WHERE username = ?", (username,)).fetchone()
        return row["role"] if row else None

    def require_user(self, username: str | None) -> str:
        if self.role(username) is None:
            raise StoreError("you are not logged in as a known user; log in again", code="unknown_user")
        return username  # type: ignore[return-value]

    def require_admin(self, username: str | None) -> str:
        if self.role(username) != "admin":
            raise StoreError("this needs an admin account", code="not_admin")
        return username  # type: ignore[return-value]

    def users(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT username, role, created_at FROM annotators ORDER BY username"
        ).fetchall()
        return [dict(r) for r in rows]

    # -- projects and items

    def upsert_project(
        self,
        project_id: str = DEFAULT_PROJECT,
        *,
        quorum: int | None = None,
        guidelines: str | None = None,
        lease_seconds: int | None = None,
    ) -> dict:
        if quorum is not None and (not isinstance(quorum, int) or quorum < 1):
            raise StoreError(f"quorum must be a whole number >= 1, got {quorum!r}", code="bad_quorum")
        if lease_seconds is not None and (not isinstance(lease_seconds, int) or lease_seconds < 1):
            raise StoreError(
                f"lease_seconds must be a whole number >= 1, got {lease_seconds!r}", code="bad_lease"
            )
        with self.write() as conn:
            row = conn.execute("SELECT * FROM projects WHERE project_id = ?", (project_id,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO projects (project_id, quorum, guidelines, lease_seconds, created_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        project_id,
                        quorum or DEFAULT_QUORUM,
                        guidelines or "",
                        lease_seconds or DEFAULT_LEASE_SECONDS,
                        self.clock(),
                    ),
                )
                self._audit(conn, None, "project_add", None, project=project_id)
            else:
                conn.execute(
                    "UPDATE projects SET quorum = ?, guidelines = ?, lease_seconds = ? WHERE project_id = ?",
                    (
                        quorum if quorum is not None else row["quorum"],
                        guidelines if guidelines is not None else row["guidelines"],
                        lease_seconds if lease_seconds is not None else row["lease_seconds"],
                        project_id,
                    ),
                )
        return self.project(project_id)

    def project(self, project_id: str) -> dict:
        row = self.conn.execute("SELECT * FROM projects WHERE project_id = ?", (project_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown project {project_id!r}", code="unknown_project")
        return dict(row)

    def projects(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM projects ORDER BY created_at")]

    def add_items(self, records: list[dict], project_id: str = DEFAULT_PROJECT) -> dict:
        """Insert validated candidate records (the candidates contract); idempotent.

        A record whose ``prompt_id`` is already stored with the same content is skipped; one with
        different content is refused (all refusals are collected, nothing is written then).
        Returns ``{"added": n, "unchanged": m}``.
        """
        self.project(project_id)
        prepared = []
        for rec in records:
            content = json.dumps({"prompt": rec["prompt"], "candidates": rec["candidates"]}, sort_keys=True)
            prepared.append((rec, hashlib.sha256(content.encode("utf-8")).hexdigest()))
        added = unchanged = 0
        conflicts = []
        with self.write() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) AS s FROM prompts").fetchone()["s"]
            for i, (rec, digest) in enumerate(prepared):
                pid = str(rec["prompt_id"])
                row = conn.execute(
                    "SELECT content_hash, project_id FROM prompts WHERE prompt_id = ?", (pid,)
                ).fetchone()
                if row is not None:
                    if row["content_hash"] == digest and row["project_id"] == project_id:
                        unchanged += 1
                    else:
                        conflicts.append(
                            f"row {i + 1}: prompt_id {pid!r} is already imported with different "
                            "content or into another project"
                        )
                    continue
                seq += 1
                conn.execute(
                    "INSERT INTO prompts (prompt_id, project_id, seq, prompt_json, prompt_text, content_hash, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        pid,
                        project_id,
                        seq,
                        json.dumps(rec["prompt"]),
                        rec.get("prompt_text") or _plain(rec["prompt"]),
                        digest,
                        self.clock(),
                    ),
                )
                for cand in rec["candidates"]:
                    conn.execute(
                        "INSERT INTO candidates (prompt_id, label, text, model, gen_json) VALUES (?, ?, ?, ?, ?)",
                        (
                            pid,
                            cand["label"],
                            cand["text"],
                            str(cand.get("model") or ""),
                            json.dumps(cand.get("gen") or {}, sort_keys=True),
                        ),
                    )
                added += 1
            if conflicts:
                raise StoreError(
                    f"{len(conflicts)} row(s) conflict with stored prompts; nothing imported: "
                    + "; ".join(conflicts[:20]),
                    code="import_conflict",
                )
            self._audit(conn, None, "import", None, project=project_id, added=added, unchanged=unchanged)
        return {"added": added, "unchanged": unchanged}

    def max_k(self) -> int:
        """The largest number of candidates of any stored prompt (0 when there are none)."""
        row = self.conn.execute(
            "SELECT MAX(n) AS k FROM (SELECT COUNT(*) AS n FROM candidates GROUP BY prompt_id) AS counts"
        ).fetchone()
        return int(row["k"] or 0)

    def _candidates(self, prompt_id: str) -> list[dict]:
        rows = self.conn.execute(
            "SELECT label, text, model, gen_json FROM candidates WHERE prompt_id = ? ORDER BY label",
            (prompt_id,),
        ).fetchall()
        return [
            {"label": r["label"], "text": r["text"], "model": r["model"], "gen": json.loads(r["gen_json"])}
            for r in rows
        ]

    def _prompt_row(self, conn, prompt_id) -> sqlite3.Row:
        if not isinstance(prompt_id, str) or len(prompt_id) > MAX_PROMPT_ID_CHARS:
            raise StoreError("unknown prompt id", code="unknown_prompt")
        row = conn.execute(
            "SELECT p.*, j.quorum, j.guidelines, j.lease_seconds FROM prompts p "
            "JOIN projects j ON j.project_id = p.project_id WHERE p.prompt_id = ?",
            (prompt_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"unknown prompt {prompt_id!r}", code="unknown_prompt")
        return row

    def _item(self, conn, username: str, prompt_id: str, expires_at: float) -> Item:
        row = self._prompt_row(conn, prompt_id)
        draft = conn.execute(
            "SELECT ranking, flags_json, comment FROM rankings WHERE prompt_id = ? AND username = ? AND status = 'draft'",
            (prompt_id, username),
        ).fetchone()
        return Item(
            prompt_id=prompt_id,
            project=row["project_id"],
            prompt=row["prompt_text"],
            candidates=[{"label": c["label"], "text": c["text"]} for c in self._candidates(prompt_id)],
            lease_expires_at=expires_at,
            guidelines=row["guidelines"],
            draft=None
            if draft is None
            else {
                "ranking": draft["ranking"],
                "flags": json.loads(draft["flags_json"]),
                "comment": draft["comment"],
            },
        )

    # -- assignment

    def next_item(self, username: str, project: str | None = None) -> Item | None:
        """The caller's current lease, or a new lease on the next prompt they should rank (None: done)."""
        with self.write() as conn:
            self.require_user(username)
            now = self.clock()
            live = conn.execute(
                "SELECT a.prompt_id, a.expires_at FROM assignments a JOIN prompts p ON p.prompt_id = a.prompt_id "
                "WHERE a.username = ? AND a.expires_at > ? AND (? IS NULL OR p.project_id = ?) "
                "ORDER BY a.leased_at LIMIT 1",
                (username, now, project, project),
            ).fetchone()
            if live is not None:
                return self._item(conn, username, live["prompt_id"], live["expires_at"])
            row = self._pick(conn, username, project, now)
            if row is None:
                return None
            expires = now + row["lease_seconds"]
            conn.execute(
                "INSERT INTO assignments (prompt_id, username, leased_at, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (prompt_id, username) DO UPDATE SET leased_at = excluded.leased_at, "
                "expires_at = excluded.expires_at",
                (row["prompt_id"], username, now, expires),
            )
            self._audit(conn, username, "lease", row["prompt_id"], expires_at=expires)
            return self._item(conn, username, row["prompt_id"], expires)

    def _pick(self, conn, username: str, project: str | None, now: float) -> sqlite3.Row | None:
        """The prompt to lease next: the caller's own draft if it still has a free slot, else the
        one with the fewest (submitted + live leases of others), oldest first.

        Rows come in (n_submitted, seq) order from an index; since taken >= n_submitted, the scan
        stops at the first row whose n_submitted cannot beat the best taken so far — after at
        most (prompts leased by others + 1) eligible rows.
        """
        leased = (
            "(SELECT COUNT(*) FROM assignments a WHERE a.prompt_id = p.prompt_id AND a.expires_at > ? "
            "AND a.username <> ?)"
        )
        draft = conn.execute(
            f"SELECT p.prompt_id, j.lease_seconds FROM rankings r JOIN prompts p ON p.prompt_id = r.prompt_id "
            f"JOIN projects j ON j.project_id = p.project_id WHERE r.username = ? AND r.status = 'draft' "
            f"AND (? IS NULL OR p.project_id = ?) AND p.n_submitted + {leased} < j.quorum "
            f"ORDER BY r.updated_at DESC LIMIT 1",
            (username, project, project, now, username),
        ).fetchone()
        if draft is not None:
            return draft
        cur = conn.execute(
            f"SELECT p.prompt_id, p.n_submitted, j.quorum, j.lease_seconds, {leased} AS leased "
            f"FROM prompts p CROSS JOIN projects j WHERE j.project_id = p.project_id "
            f"AND (? IS NULL OR p.project_id = ?) AND p.n_submitted < j.quorum "
            f"AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_id = p.prompt_id AND r.username = ? "
            f"AND r.status IN ('submitted', 'skipped')) ORDER BY p.n_submitted, p.seq",
            (now, username, project, project, username),
        )
        best, best_taken = None, None
        for row in cur:
            if best_taken is not None and row["n_submitted"] >= best_taken:
                break
            taken = row["n_submitted"] + row["leased"]
            if taken < row["quorum"] and (best_taken is None or taken < best_taken):
                best, best_taken = row, taken
        cur.close()
        return best

    def release(self, username: str, prompt_id: str) -> None:
        """Give a lease back early (the prompt returns to the pool at once)."""
        with self.write() as conn:
            conn.execute(
                "DELETE FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
            )
            self._audit(conn, username, "release", prompt_id)

    def _live_lease(self, conn, username: str, prompt_id: str) -> sqlite3.Row:
        lease = conn.execute(
            "SELECT leased_at, expires_at FROM assignments WHERE prompt_id = ? AND username = ?",
            (prompt_id, username),
        ).fetchone()
        if lease is None:
            raise StoreError(
                f"prompt {prompt_id!r} is not assigned to you; press Next to get your next prompt",
                code="not_assigned",
            )
        if lease["expires_at"] <= self.clock():
            raise StoreError(
                f"your time on prompt {prompt_id!r} ran out and it went back to the pool; your draft is kept — "
                "press Next to continue",
                code="lease_expired",
            )
        return lease

    def _existing(self, conn, username: str, prompt_id: str) -> sqlite3.Row | None:
        return conn.execute(
            "SELECT * FROM rankings WHERE prompt_id = ? AND username = ?", (prompt_id, username)
        ).fetchone()

    def save_draft(
        self, username: str, prompt_id: str, ranking: str = "", flags=None, comment: str = ""
    ) -> bool:
        """Keep what the annotator has typed so far (any text, even a half-typed ranking); renews the lease.

        Returns False, storing nothing, when the caller already submitted or skipped the prompt:
        a draft event that arrives after the submit (the page sends drafts as you type) is stale,
        not a mistake of the annotator.
        """
        ranking = _check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = _check_text(comment, "comment", MAX_COMMENT_CHARS)
        flags = check_flags(flags)
        with self.write() as conn:
            self.require_user(username)
            row = self._prompt_row(conn, prompt_id)
            existing = self._existing(conn, username, prompt_id)
            if existing is not None and existing["status"] != "draft":
                return False
            self._live_lease(conn, username, prompt_id)
            now = self.clock()
            conn.execute(
                "INSERT INTO rankings (prompt_id, username, status, ranking, flags_json, comment, created_at, updated_at)"
                " VALUES (?, ?, 'draft', ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, username) DO UPDATE SET "
                "ranking = excluded.ranking, flags_json = excluded.flags_json, comment = excluded.comment, "
                "updated_at = excluded.updated_at",
                (prompt_id, username, ranking, json.dumps(flags), comment, now, now),
            )
            # An annotator who is still working keeps the prompt.
            conn.execute(
                "UPDATE assignments SET expires_at = ? WHERE prompt_id = ? AND username = ? AND expires_at < ?",
                (now + row["lease_seconds"], prompt_id, username, now + row["lease_seconds"]),
            )
            return True

    def submit(
        self,
        username: str,
        prompt_id: str,
        ranking: str,
        flags=None,
        comment: str = "",
        client_token: str | None = None,
    ) -> SubmitResult:
        """Store a complete ranking for a leased prompt; idempotent on ``client_token``."""
        ranking = _check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = _check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = _check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        flags = check_flags(flags)
        with self.write() as conn:
            self.require_user(username)
            self._prompt_row(conn, prompt_id)
            existing = self._existing(conn, username, prompt_id)
            if existing is not None and client_token and existing["client_token"] == client_token:
                return _result(existing, duplicate=True)
            if existing is not None and existing["status"] != "draft":
                raise StoreError(
                    f"you have already {existing['status']} prompt {prompt_id!r}; revise it from your history instead",
                    code="already_done",
                )
            lease = self._live_lease(conn, username, prompt_id)
            labels = [c["label"] for c in self._candidates(prompt_id)]
            parsed = parse_for_submit(ranking, labels, flags)
            now = self.clock()
            conn.execute(
                "INSERT INTO rankings (prompt_id, username, status, ranking, tiers_json, flags_json, comment, client_token,"
                " created_at, updated_at, submitted_at, time_spent) VALUES (?, ?, 'submitted', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (prompt_id, username) DO UPDATE SET status = 'submitted', ranking = excluded.ranking,"
                " tiers_json = excluded.tiers_json, flags_json = excluded.flags_json, comment = excluded.comment,"
                " client_token = excluded.client_token, updated_at = excluded.updated_at,"
                " submitted_at = excluded.submitted_at, time_spent = excluded.time_spent",
                (
                    prompt_id,
                    username,
                    str(parsed),
                    json.dumps([list(t) for t in parsed.tiers]),
                    json.dumps(flags),
                    comment,
                    client_token,
                    now,
                    now,
                    now,
                    now - lease["leased_at"],
                ),
            )
            conn.execute("UPDATE prompts SET n_submitted = n_submitted + 1 WHERE prompt_id = ?", (prompt_id,))
            conn.execute(
                "DELETE FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
            )
            self._audit(
                conn, username, "submit", prompt_id, ranking=str(parsed), flags=flags, token=client_token
            )
            return _result(self._existing(conn, username, prompt_id))

    def skip(
        self, username: str, prompt_id: str, comment: str = "", client_token: str | None = None
    ) -> SubmitResult:
        """Decline a leased prompt: it is never offered to this annotator again and counts for nobody."""
        comment = _check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = _check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        with self.write() as conn:
            self.require_user(username)
            self._prompt_row(conn, prompt_id)
            existing = self._existing(conn, username, prompt_id)
            if existing is not None and client_token and existing["client_token"] == client_token:
                return _result(existing, duplicate=True)
            if existing is not None and existing["status"] != "draft":
                raise StoreError(
                    f"you have already {existing['status']} prompt {prompt_id!r}", code="already_done"
                )
            lease = self._live_lease(conn, username, prompt_id)
            now = self.clock()
            conn.execute(
                "INSERT INTO rankings (prompt_id, username, status, ranking, comment, client_token, created_at, updated_at,"
                " time_spent) VALUES (?, ?, 'skipped', '', ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, username) DO UPDATE SET"
                " status = 'skipped', ranking = '', tiers_json = '[]', comment = excluded.comment,"
                " client_token = excluded.client_token, updated_at = excluded.updated_at, time_spent = excluded.time_spent",
                (prompt_id, username, comment, client_token, now, now, now - lease["leased_at"]),
            )
            conn.execute(
                "DELETE FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
            )
            self._audit(conn, username, "skip", prompt_id, token=client_token)
            return _result(self._existing(conn, username, prompt_id))

    def revise(
        self,
        username: str,
        prompt_id: str,
        ranking: str,
        flags=None,
        comment: str = "",
        client_token: str | None = None,
    ) -> SubmitResult:
        """Change the caller's own submitted ranking (no lease needed); the old value goes to the audit log."""
        ranking = _check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = _check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = _check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        flags = check_flags(flags)
        with self.write() as conn:
            self.require_user(username)
            self._prompt_row(conn, prompt_id)
            existing = self._existing(conn, username, prompt_id)
            if existing is None or existing["status"] != "submitted":
                raise StoreError(
                    f"you have no submitted ranking of prompt {prompt_id!r} to revise", code="not_submitted"
                )
            if client_token and existing["client_token"] == client_token:
                return _result(existing, duplicate=True)
            labels = [c["label"] for c in self._candidates(prompt_id)]
            parsed = parse_for_submit(ranking, labels, flags)
            conn.execute(
                "UPDATE rankings SET ranking = ?, tiers_json = ?, flags_json = ?, comment = ?, client_token = ?,"
                " updated_at = ?, revision = revision + 1 WHERE ranking_id = ?",
                (
                    str(parsed),
                    json.dumps([list(t) for t in parsed.tiers]),
                    json.dumps(flags),
                    comment,
                    client_token,
                    self.clock(),
                    existing["ranking_id"],
                ),
            )
            self._audit(
                conn,
                username,
                "revise",
                prompt_id,
                old=existing["ranking"],
                old_flags=json.loads(existing["flags_json"]),
                new=str(parsed),
                flags=flags,
                token=client_token,
            )
            return _result(self._existing(conn, username, prompt_id))

    # -- per-user views (only ever the caller's own rows)

    def history(self, username: str) -> list[dict]:
        rows = self.conn.execute(
            "SELECT r.prompt_id, r.status, r.ranking, r.flags_json, r.comment, r.revision, r.submitted_at, "
            "r.updated_at, p.prompt_text FROM rankings r JOIN prompts p ON p.prompt_id = r.prompt_id "
            "WHERE r.username = ? AND r.status IN ('submitted', 'skipped') ORDER BY r.updated_at DESC",
            (username,),
        ).fetchall()
        return [
            {**{k: r[k] for k in r.keys() if k != "flags_json"}, "flags": json.loads(r["flags_json"])}
            for r in rows
        ]

    def own_ranking(self, username: str, prompt_id: str) -> dict:
        """The caller's own row for a prompt, with the prompt and its responses (for revising)."""
        conn = self.conn
        self._prompt_row(conn, prompt_id)
        row = self._existing(conn, username, prompt_id)
        if row is None or row["status"] == "draft":
            raise StoreError(f"you have no submitted ranking of prompt {prompt_id!r}", code="not_submitted")
        prompt = self._prompt_row(conn, prompt_id)
        return {
            "prompt_id": prompt_id,
            "status": row["status"],
            "ranking": row["ranking"],
            "flags": json.loads(row["flags_json"]),
            "comment": row["comment"],
            "revision": row["revision"],
            "prompt": prompt["prompt_text"],
            "candidates": [{"label": c["label"], "text": c["text"]} for c in self._candidates(prompt_id)],
        }

    def progress(self, username: str) -> dict:
        conn = self.conn
        mine = {
            r["status"]: r["n"]
            for r in conn.execute(
                "SELECT status, COUNT(*) AS n FROM rankings WHERE username = ? GROUP BY status", (username,)
            )
        }
        total = conn.execute("SELECT COUNT(*) AS n FROM prompts").fetchone()["n"]
        open_ = conn.execute(
            "SELECT COUNT(*) AS n FROM prompts p JOIN projects j ON j.project_id = p.project_id "
            "WHERE p.n_submitted < j.quorum"
        ).fetchone()["n"]
        return {
            "submitted": mine.get("submitted", 0),
            "skipped": mine.get("skipped", 0),
            "drafts": mine.get("draft", 0),
            "prompts": total,
            "prompts_needing_rankings": open_,
        }

    # -- admin views

    def stats(self) -> dict:
        """Progress per annotator and per prompt, time per item (admin)."""
        conn = self.conn
        per_user = [
            dict(r)
            for r in conn.execute(
                "SELECT a.username, a.role, "
                "SUM(CASE WHEN r.status = 'submitted' THEN 1 ELSE 0 END) AS submitted, "
                "SUM(CASE WHEN r.status = 'skipped' THEN 1 ELSE 0 END) AS skipped, "
                "SUM(CASE WHEN r.status = 'draft' THEN 1 ELSE 0 END) AS drafts, "
                "AVG(CASE WHEN r.status = 'submitted' THEN r.time_spent END) AS mean_seconds "
                "FROM annotators a LEFT JOIN rankings r ON r.username = a.username GROUP BY a.username, a.role "
                "ORDER BY a.username"
            )
        ]
        now = self.clock()
        per_prompt = [
            dict(r)
            for r in conn.execute(
                "SELECT p.prompt_id, p.project_id, j.quorum, "
                "(SELECT COUNT(*) FROM rankings r WHERE r.prompt_id = p.prompt_id AND r.status = 'submitted') AS submitted, "
                "(SELECT COUNT(*) FROM rankings r WHERE r.prompt_id = p.prompt_id AND r.status = 'skipped') AS skipped, "
                "(SELECT COUNT(*) FROM assignments a WHERE a.prompt_id = p.prompt_id AND a.expires_at > ?) AS leased "
                "FROM prompts p JOIN projects j ON j.project_id = p.project_id ORDER BY p.seq",
                (now,),
            )
        ]
        times = [
            r["time_spent"]
            for r in conn.execute(
                "SELECT time_spent FROM rankings WHERE status = 'submitted' AND time_spent IS NOT NULL"
            )
        ]
        times.sort()
        return {
            "annotators": per_user,
            "prompts": per_prompt,
            "complete_prompts": sum(1 for p in per_prompt if p["submitted"] >= p["quorum"]),
            "submitted": sum(p["submitted"] for p in per_prompt),
            "median_seconds_per_item": times[len(times) // 2] if times else math.nan,
        }

    def submitted_rankings(self, project: str | None = None) -> list[dict]:
        """Every submitted ranking in the rankings contract (admin export)."""
        conn = self.conn
        rows = conn.execute(
            "SELECT r.*, p.prompt_json, p.project_id FROM rankings r JOIN prompts p ON p.prompt_id = r.prompt_id "
            "WHERE r.status = 'submitted' AND (? IS NULL OR p.project_id = ?) ORDER BY p.seq, r.username",
            (project, project),
        ).fetchall()
        cache: dict[str, list[dict]] = {}
        out = []
        for r in rows:
            if r["prompt_id"] not in cache:
                cache[r["prompt_id"]] = self._candidates(r["prompt_id"])
            out.append(
                {
                    "prompt_id": r["prompt_id"],
                    "prompt": json.loads(r["prompt_json"]),
                    "candidates": cache[r["prompt_id"]],
                    "ranking": r["ranking"],
                    "tiers": json.loads(r["tiers_json"]),
                    "annotator": r["username"],
                    "flags": json.loads(r["flags_json"]),
                    "created_at": _iso(r["submitted_at"] or r["updated_at"]),
                    "comment": r["comment"],
                    "time_spent": r["time_spent"],
                    "revision": r["revision"],
                    "project": r["project_id"],
                }
            )
        return out

    def audit_log(self, limit: int = 1000) -> list[dict]:
        rows = self.conn.execute(
            "SELECT * FROM audit_log ORDER BY entry_id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict:
        conn = self.conn
        return {
            t: conn.execute(f"SELECT COUNT(*) AS n FROM {t}").fetchone()["n"]  # noqa: S608 (fixed names)
            for t in (
                "annotators",
                "projects",
                "prompts",
                "candidates",
                "assignments",
                "rankings",
                "audit_log",
            )
        }


def _result(row: sqlite3.Row, duplicate: bool = False) -> SubmitResult:
    return SubmitResult(
        prompt_id=row["prompt_id"],
        status=row["status"],
        ranking=row["ranking"],
        flags=json.loads(row["flags_json"]),
        duplicate=duplicate,
        revision=row["revision"],
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _plain(prompt) -> str:
    """Plain text of a prompt that may be a list of chat messages."""
    if isinstance(prompt, str):
        return prompt
    try:
        from rlhf.data import prompt_text

        return prompt_text(prompt)
    except ImportError:  # rlhf.data not importable: a readable fallback for chat messages
        return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)
