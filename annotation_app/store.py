"""The annotation store: users, prompts, leases, rankings and an audit log in one SQLite file.

No Gradio here: the page, the scripted API and the command line all go through :class:`Store`,
so validation, assignment and idempotency are written (and tested) once. This module holds the
connections and every operation that writes; the read-only queries are in
:mod:`annotation_app.queries` (a base class of :class:`Store`), the tables and migrations in
:mod:`annotation_app.schema`, password hashing and login in :mod:`annotation_app.auth`, input
checks in :mod:`annotation_app.validation` and the returned records in
:mod:`annotation_app.records`.

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
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from annotation_app import auth, schema
from annotation_app.auth import (
    MAX_PASSWORD_CHARS,
    MAX_USERNAME_CHARS,
    MIN_PASSWORD_CHARS,
    LoginThrottle,
    hash_password,
)
from annotation_app.errors import StoreError
from annotation_app.queries import StoreQueries
from annotation_app.records import Item, SubmitResult, result_from_row
from annotation_app.schema import DEFAULT_LEASE_SECONDS, MIGRATIONS, ROLES, SCHEMA_VERSION, STATUSES
from annotation_app.validation import (
    FLAGS,
    MAX_COMMENT_CHARS,
    MAX_PROMPT_ID_CHARS,
    MAX_RANKING_CHARS,
    MAX_TOKEN_CHARS,
    check_flags,
    check_text,
    parse_for_submit,
)
from rlhf.contracts import prompt_text

# The names below that this module does not use moved to auth, schema and validation; they stay
# importable from annotation_app.store for user code.
__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_PROJECT",
    "DEFAULT_QUORUM",
    "FLAGS",
    "MAX_COMMENT_CHARS",
    "MAX_PASSWORD_CHARS",
    "MAX_PROMPT_ID_CHARS",
    "MAX_RANKING_CHARS",
    "MAX_TOKEN_CHARS",
    "MAX_USERNAME_CHARS",
    "MIGRATIONS",
    "MIN_PASSWORD_CHARS",
    "ROLES",
    "SCHEMA_VERSION",
    "STATUSES",
    "Item",
    "LoginThrottle",
    "Store",
    "StoreError",
    "SubmitResult",
    "check_flags",
    "hash_password",
    "parse_for_submit",
]

DEFAULT_PROJECT = "default"
DEFAULT_QUORUM = 3


class Store(StoreQueries):
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
        schema.write_audit(conn, self.clock(), username, action, prompt_id, **detail)

    def migrate(self) -> int:
        """Bring the database to :data:`SCHEMA_VERSION`, one transaction per step; return it."""
        return schema.migrate(self)

    # -- users

    def add_user(
        self, username: str, password: str, role: str = "annotator", *, replace: bool = False
    ) -> None:
        username = auth.check_new_account(username, password, role)
        kdf, salt, digest = auth.hash_password(password)
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
                        rec.get("prompt_text") or prompt_text(rec["prompt"]),
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

    def save_draft(
        self, username: str, prompt_id: str, ranking: str = "", flags=None, comment: str = ""
    ) -> bool:
        """Keep what the annotator has typed so far (any text, even a half-typed ranking); renews the lease.

        Returns False, storing nothing, when the caller already submitted or skipped the prompt:
        a draft event that arrives after the submit (the page sends drafts as you type) is stale,
        not a mistake of the annotator.
        """
        ranking = check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
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
        ranking = check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        flags = check_flags(flags)
        with self.write() as conn:
            self.require_user(username)
            self._prompt_row(conn, prompt_id)
            existing = self._existing(conn, username, prompt_id)
            if existing is not None and client_token and existing["client_token"] == client_token:
                return result_from_row(existing, duplicate=True)
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
            return result_from_row(self._existing(conn, username, prompt_id))

    def skip(
        self, username: str, prompt_id: str, comment: str = "", client_token: str | None = None
    ) -> SubmitResult:
        """Decline a leased prompt: it is never offered to this annotator again and counts for nobody."""
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        with self.write() as conn:
            self.require_user(username)
            self._prompt_row(conn, prompt_id)
            existing = self._existing(conn, username, prompt_id)
            if existing is not None and client_token and existing["client_token"] == client_token:
                return result_from_row(existing, duplicate=True)
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
            return result_from_row(self._existing(conn, username, prompt_id))

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
        ranking = check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
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
                return result_from_row(existing, duplicate=True)
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
            return result_from_row(self._existing(conn, username, prompt_id))
