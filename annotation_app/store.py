"""The annotation store: users, prompts, leases, rankings and an audit log, in SQLite or PostgreSQL.

No Gradio here: the page, the scripted API and the command line all go through :class:`Store`,
so validation, assignment and idempotency are written (and tested) once. This module holds every
operation that writes; the read-only queries are in :mod:`annotation_app.queries` (a base class
of :class:`Store`), the tables and migrations in :mod:`annotation_app.schema`, the connections,
transactions and the two databases' differences in :mod:`annotation_app.database`, password
hashing and login in :mod:`annotation_app.auth`, input checks in
:mod:`annotation_app.validation` and the returned records in :mod:`annotation_app.records`.

``Store(path)`` opens a SQLite file (``:memory:`` too); ``Store("postgresql://user@host/db")``
opens a PostgreSQL database, which several app processes can serve at once. The SQL is written
once, in SQLite's spelling, and is portable (``ON CONFLICT``, no database functions for time,
timestamps as epoch seconds).

Durability and concurrency (docs/environment.md, "SQLite under concurrent writers"):

* every transaction that may write is :meth:`Store.write`: ``BEGIN IMMEDIATE`` on SQLite, a
  database-wide advisory lock on PostgreSQL — one writer at a time on either, across threads and
  processes, so a transaction's reads stay true until it commits;
* SQLite: WAL journal, ``busy_timeout``, ``synchronous=FULL`` (an acknowledged submit survives a
  crash or power loss), one connection per thread (Gradio runs handlers on a thread pool);
  PostgreSQL: a connection pool, commits durable by the server's defaults.

Assignment (Argilla's per-record quorum, Label Studio's task locks):

* a prompt needs ``quorum`` submitted rankings from distinct annotators (per project);
* ``next_item`` returns the caller's live lease if they have one, otherwise leases the prompt
  with the fewest (submitted + live-leased) rankings that the caller has not submitted or
  skipped and that still has a free slot — a prompt where the caller has a draft comes first;
* gold items (a known answer in ``prompts.gold``, :mod:`annotation_app.gold`) are outside the
  quorum: each annotator may get each once, unannounced, at the project's ``gold_rate``;
* a lease expires after ``lease_seconds``; expired leases stop counting against the quorum, so
  the prompt returns to the pool; saving a draft renews the caller's lease;
* a submit needs a live lease held by the caller, and a (prompt, annotator) pair has one
  ranking row (``UNIQUE``), so nobody ranks a prompt twice; later changes go through
  :meth:`Store.revise`, which keeps the old value in the audit log;
* submits are idempotent on a client token: sending the same token again (a double click, a
  retry after a lost reply) returns the stored result and changes nothing.

A ranking may carry an ``edit``: the annotator's corrected version of the response they ranked
best (one response: a tie at the top cannot be edited). An edit that is empty or leaves that
response as it was is stored as NULL.

Pre-annotation: a model's proposed ranking of a prompt (:meth:`Store.set_proposals`) reaches only
annotators who opted in (:meth:`Store.set_show_proposals`); each submit records in
``proposal_shown`` whether it was shown then, and in ``seen_proposal`` which proposed ranking (a
later ``set_proposals`` replaces the prompt's proposal, not what was seen). A revision keeps both:
the history tab shows no proposal, and the ranking revised is the one made with or without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from annotation_app import auth, schema
from annotation_app.auth import (
    MAX_PASSWORD_CHARS,
    MAX_USERNAME_CHARS,
    MIN_PASSWORD_CHARS,
    LoginThrottle,
    hash_password,
)
from annotation_app.database import AnyRow, open_database
from annotation_app.errors import StoreError
from annotation_app.gold import gold_problems, gold_ranking, serve_gold
from annotation_app.queries import StoreQueries
from annotation_app.records import Item, SubmitResult, result_from_row
from annotation_app.schema import (
    DEFAULT_LEASE_SECONDS,
    MIGRATIONS,
    PROJECT_KINDS,
    ROLES,
    SCHEMA_VERSION,
    STATUSES,
)
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
from rlhf.rankings import Ranking, RankingError, parse_ranking

# The names below that this module does not use moved to auth, schema and validation; they stay
# importable from annotation_app.store for user code.
__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_PROJECT",
    "DEFAULT_QUORUM",
    "FLAGS",
    "MAX_COMMENT_CHARS",
    "MAX_EDIT_CHARS",
    "MAX_PASSWORD_CHARS",
    "MAX_PROMPT_ID_CHARS",
    "MAX_RANKING_CHARS",
    "MAX_TOKEN_CHARS",
    "MAX_USERNAME_CHARS",
    "MIGRATIONS",
    "MIN_PASSWORD_CHARS",
    "PROJECT_KINDS",
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
# An edit is a corrected response: the longest response the app imports (io.MAX_RESPONSE_CHARS).
MAX_EDIT_CHARS = 20_000
# rankings.proposal_shown and rankings.seen_proposal of a submit (parameters of each: prompt id,
# user name): whether the annotator sees the prompt's proposal now, and which proposed ranking,
# under the condition of StoreQueries._shown_proposal (a proposal, a ranking project, the
# annotator's opt-in); NULL when there is no proposal to show (seen_proposal: or it is not shown).
# Computed in the INSERT itself: no extra round trip inside the write lock.
_NO_PROPOSAL_TO_SHOW = "p.proposal IS NULL OR j.kind <> 'ranking'"


def _proposal_at_submit(value: str) -> str:
    return (
        f"(SELECT CASE WHEN {_NO_PROPOSAL_TO_SHOW} THEN NULL ELSE {value} END"
        " FROM prompts p JOIN projects j ON j.project_id = p.project_id, annotators a"
        " WHERE p.prompt_id = ? AND a.username = ?)"
    )


PROPOSAL_SHOWN = _proposal_at_submit("a.show_proposals")
SEEN_PROPOSAL = _proposal_at_submit("CASE WHEN a.show_proposals = 1 THEN p.proposal END")


class Store(StoreQueries):
    """All reads and writes of the annotation database (thread-safe).

    ``db`` is a SQLite file path (or ``:memory:``) or a ``postgresql://`` URL
    (:func:`annotation_app.database.open_database`; a bad URL or an unreachable server is a
    :class:`StoreError` here, before any work).
    """

    def __init__(self, db: str | os.PathLike, *, busy_timeout_ms: int = 30_000, clock=time.time):
        self.path = str(db)
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self.db = open_database(db, busy_timeout_ms=busy_timeout_ms)
        self._candidate_rows = {}  # each prompt's responses, once read (StoreQueries._candidates)
        self._known_users = set()  # accounts, once found (StoreQueries.require_user)
        self.migrate()

    # -- connections and transactions

    @property
    def conn(self):
        """This thread's connection: its open write transaction's, else one for reads."""
        return self.db.connection()

    def close(self) -> None:
        self.db.close()

    def write(self):
        """A write transaction (rolled back on any exception): one writer at a time, database-wide.

        Keep it short, since every other writer waits: users and prompts are never deleted and a
        prompt's responses never change (an import refuses different content), so operations
        check them before the transaction; inside go the reads that other annotators' writes
        change (leases, rankings, counts) and the writes.
        """
        return self.db.transaction()

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

    def set_show_proposals(self, username: str, on: bool) -> None:
        """The annotator's own choice to see (``on``) or not a model's proposed ranking of each
        item on the ranking screen (pre-annotation; off by default, so nobody is anchored unasked)."""
        if not isinstance(on, bool):
            raise StoreError(f"show_proposals must be true or false, got {on!r}", code="bad_input")
        self.require_user(username)
        with self.write() as conn:
            conn.execute("UPDATE annotators SET show_proposals = ? WHERE username = ?", (int(on), username))
            self._audit(conn, username, "show_proposals", None, on=on)

    # -- projects and items

    def upsert_project(
        self,
        project_id: str = DEFAULT_PROJECT,
        *,
        quorum: int | None = None,
        guidelines: str | None = None,
        lease_seconds: int | None = None,
        kind: str | None = None,
        gold_rate: float | None = None,
    ) -> dict:
        """Create or update a project; a field left None keeps its stored value (or the default).

        ``kind`` is fixed when the project is created: ``ranking`` (the default) or ``arena``.
        ``gold_rate`` is the share of an annotator's items drawn from the project's gold items."""
        if kind is not None and kind not in PROJECT_KINDS:
            raise StoreError(
                f"project kind must be one of {', '.join(PROJECT_KINDS)}, got {kind!r}", code="bad_kind"
            )
        if gold_rate is not None and (
            isinstance(gold_rate, bool) or not isinstance(gold_rate, int | float) or not 0 <= gold_rate <= 1
        ):
            raise StoreError(
                f"gold_rate must be a number from 0 to 1, got {gold_rate!r}", code="bad_gold_rate"
            )
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
                    "INSERT INTO projects (project_id, quorum, guidelines, lease_seconds, kind, gold_rate, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        project_id,
                        quorum or DEFAULT_QUORUM,
                        guidelines or "",
                        lease_seconds or DEFAULT_LEASE_SECONDS,
                        kind or "ranking",
                        float(gold_rate or 0.0),
                        self.clock(),
                    ),
                )
                self._audit(conn, None, "project_add", None, project=project_id, kind=kind or "ranking")
            else:
                if kind is not None and kind != row["kind"]:
                    raise StoreError(
                        f"project {project_id!r} is a {row['kind']} project; its kind cannot change to {kind!r}",
                        code="bad_kind",
                    )
                conn.execute(
                    "UPDATE projects SET quorum = ?, guidelines = ?, lease_seconds = ?, gold_rate = ? WHERE project_id = ?",
                    (
                        quorum if quorum is not None else row["quorum"],
                        guidelines if guidelines is not None else row["guidelines"],
                        lease_seconds if lease_seconds is not None else row["lease_seconds"],
                        float(gold_rate) if gold_rate is not None else row["gold_rate"],
                        project_id,
                    ),
                )
        return self.project(project_id)

    def set_proposals(self, proposals: dict[str, str], source: str) -> int:
        """Store a model's proposed ranking per prompt (``{prompt_id: ranking}``, canonical text over
        the prompt's labels), replacing earlier ones; only annotators who opted in see them
        (:meth:`set_show_proposals`). Returns how many.

        Every proposal is checked first; an unknown prompt or a ranking that does not name the
        prompt's labels is refused with nothing written."""
        problems, canonical = [], {}
        for prompt_id, text in proposals.items():
            labels = [c["label"] for c in self._candidates(prompt_id)]
            if not labels:
                problems.append(f"{prompt_id}: unknown prompt")
                continue
            try:
                canonical[prompt_id] = str(parse_ranking(text, labels))
            except RankingError as err:
                problems.append(f"{prompt_id}: {err}")
        if problems:
            raise StoreError("proposals refused: " + "; ".join(problems[:5]), code="bad_proposal")
        with self.write() as conn:
            for prompt_id, text in canonical.items():
                conn.execute(
                    "UPDATE prompts SET proposal = ?, proposal_source = ? WHERE prompt_id = ?",
                    (text, source, prompt_id),
                )
            self._audit(conn, None, "propose", None, source=source, prompts=len(canonical))
        return len(canonical)

    def set_serve_order(self, order: list[str], source: str, project: str | None = None) -> int:
        """Serve ``order``'s prompts first, in that order, among prompts with equally many rankings
        (active selection: ``rlhf annotate prioritize`` puts the least certain first); the other
        prompts of ``project`` (None: all) follow in import order. Returns how many were ordered.
        An unknown prompt id is refused with nothing written."""
        known = {p["prompt_id"] for p in self.prompts_for_proposal(project)}
        unknown = [pid for pid in order if pid not in known]
        if unknown:
            raise StoreError(
                f"{len(unknown)} prompt id(s) to prioritise are not stored"
                + (f" in project {project!r}" if project else "")
                + f": {', '.join(map(repr, unknown[:5]))}",
                code="unknown_prompt",
            )
        if len(set(order)) != len(order):
            raise StoreError("the order to serve names a prompt twice", code="bad_order")
        with self.write() as conn:
            conn.execute(
                "UPDATE prompts SET serve_order = seq + ? WHERE (CAST(? AS TEXT) IS NULL OR project_id = ?)",
                (len(order), project, project),
            )
            for position, prompt_id in enumerate(order, 1):
                conn.execute("UPDATE prompts SET serve_order = ? WHERE prompt_id = ?", (position, prompt_id))
            self._audit(conn, None, "prioritize", None, source=source, prompts=len(order), project=project)
        return len(order)

    def add_items(
        self, records: list[dict], project_id: str = DEFAULT_PROJECT, correct_gold: bool = False
    ) -> dict:
        """Insert validated candidate records (the candidates contract); idempotent.

        A record whose ``prompt_id`` is already stored with the same content is skipped; one with
        different content is refused (all refusals are collected, nothing is written then).
        A record may carry ``gold``, the prompt's known answer (:mod:`annotation_app.gold`): a
        bad one is refused, with its row, before anything is written. The canonical answer is
        part of the content, so re-importing a prompt with a different gold answer (or adding or
        dropping one) is refused like changed responses; a prompt without one hashes as before.

        ``correct_gold``: a stored gold item whose prompt and responses are unchanged takes the
        record's new answer instead (a mistyped answer is fixed by importing the corrected file).
        Each correction is audited with the old and the new answer. Accuracy on gold items is
        computed when it is read, so every ranking already made is judged against the new answer.
        Adding or dropping an answer is still refused: it would move the prompt into or out of
        the quorum after annotators ranked it.

        Returns ``{"added": n, "unchanged": m}``, and ``"gold_corrected"`` with ``correct_gold``.
        """
        self.project(project_id)
        problems = gold_problems(records)
        if problems:
            raise StoreError(
                f"{len(problems)} row(s) have a bad gold answer; nothing imported: "
                + "; ".join(problems[:20]),
                code="bad_gold",
            )
        prepared = []
        for rec in records:
            gold = gold_ranking(rec.get("gold"), [c["label"] for c in rec["candidates"]])
            gold = None if gold is None else str(gold)
            prepared.append((rec, _content_hash(rec, gold), gold))
        added = unchanged = added_gold = 0
        corrected: list[tuple[str, str, str]] = []  # (prompt_id, old answer, new answer)
        conflicts = []
        with self.write() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) AS s FROM prompts").fetchone()["s"]
            for i, (rec, digest, gold) in enumerate(prepared):
                pid = str(rec["prompt_id"])
                row = conn.execute(
                    "SELECT content_hash, project_id, gold FROM prompts WHERE prompt_id = ?", (pid,)
                ).fetchone()
                if row is not None:
                    if row["content_hash"] == digest and row["project_id"] == project_id:
                        unchanged += 1
                    elif (
                        correct_gold
                        and row["project_id"] == project_id
                        and row["gold"] is not None
                        and gold is not None
                        and _content_hash(rec, row["gold"]) == row["content_hash"]  # only the answer differs
                    ):
                        conn.execute(
                            "UPDATE prompts SET gold = ?, content_hash = ? WHERE prompt_id = ?",
                            (gold, digest, pid),
                        )
                        corrected.append((pid, row["gold"], gold))
                    else:
                        conflicts.append(
                            f"row {i + 1}: prompt_id {pid!r} is already imported with different "
                            "content (responses or gold answer) or into another project"
                        )
                    continue
                seq += 1
                conn.execute(
                    "INSERT INTO prompts (prompt_id, project_id, seq, serve_order, prompt_json, prompt_text, "
                    "content_hash, gold, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        pid,
                        project_id,
                        seq,
                        seq,
                        json.dumps(rec["prompt"]),
                        rec.get("prompt_text") or prompt_text(rec["prompt"]),
                        digest,
                        gold,
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
                added_gold += gold is not None
            if conflicts:
                raise StoreError(
                    f"{len(conflicts)} row(s) conflict with stored prompts; nothing imported: "
                    + "; ".join(conflicts[:20]),
                    code="import_conflict",
                )
            for pid, before, after in corrected:
                self._audit(conn, None, "correct_gold", pid, before=before, after=after)
            self._audit(
                conn,
                None,
                "import",
                None,
                project=project_id,
                added=added,
                unchanged=unchanged,
                gold=added_gold,
                **({"gold_corrected": len(corrected)} if correct_gold else {}),
            )
        result = {"added": added, "unchanged": unchanged}
        return {**result, "gold_corrected": len(corrected)} if correct_gold else result

    # -- assignment

    def next_item(self, username: str, project: str | None = None, kind: str = "ranking") -> Item | None:
        """The caller's current lease, or a new lease on the next prompt they should rank (None: done),
        among the prompts of ``project`` (None: every project) of this ``kind`` (``ranking`` for the
        ranking screen, ``arena`` for the arena's pairs)."""
        self.require_user(username)
        with self.write() as conn:
            now = self.clock()
            choice = self._choose(conn, username, project, kind, now)
            if choice is None:
                return None
            prompt_id, expires, new_lease = choice
            if new_lease:
                conn.execute(
                    "INSERT INTO assignments (prompt_id, username, leased_at, expires_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (prompt_id, username) DO UPDATE SET leased_at = excluded.leased_at, "
                    "expires_at = excluded.expires_at",
                    (prompt_id, username, now, expires),
                )
                self._audit(conn, username, "lease", prompt_id, expires_at=expires)
        # The prompt, its responses and the caller's own draft: nobody else changes them, so they
        # are read after the commit, without holding up other writers.
        return self._item(self.conn, username, prompt_id, expires)

    def _choose(
        self, conn, username: str, project: str | None, kind: str, now: float
    ) -> tuple[str, float, bool] | None:
        """``(prompt_id, lease end, new lease?)`` of the prompt to give the caller: their live
        lease; else their own draft if it still has a free slot (a gold item's always has one);
        else, when the gold draw says so, a gold item; else the prompt with the fewest (submitted
        + live leases of others), first in serve order (import order, or the order ``rlhf annotate
        prioritize`` set). None: nothing left for them. Only prompts of projects of ``kind``
        count, leases included: the arena tab never hands out a ranking item.

        Gold items (``prompts.gold``, :mod:`annotation_app.gold`) are outside the quorum: every
        annotator may answer each one once, and the neediest query never returns one. The gold
        query returns the caller's first unseen gold item in serve order, with its project's
        ``gold_rate`` and how many items of this kind (and project) the caller has submitted or
        skipped; :func:`~annotation_app.gold.serve_gold` draws on those. Serve order rather than a
        per-annotator shuffle: annotators then answer the same gold items first, so their
        accuracies are measured on the same items and compare fairly, and ``prioritize`` can
        order gold items like any others. With ``project`` None the first unseen gold item's
        project's rate applies. A project with rate 0 never serves its gold items; one with a
        rate above 0 serves them also when no other item is left for the caller.

        The four queries are sent before any is read: on PostgreSQL, in pipeline mode, one
        round trip inside the write lock instead of four. Rows of the neediest come in
        (n_submitted, serve_order) order from an index; since taken >= n_submitted, the scan stops
        at the first row whose n_submitted cannot beat the best taken so far. Before that it sees
        at most one row without leases of others (its taken is its n_submitted), so the first
        (prompts leased by others + 1) rows hold the answer: the query reads no more (gold
        leases count in that limit too: a bound above the need is still right).
        """
        in_project = "(CAST(? AS TEXT) IS NULL OR p.project_id = ?) AND j.kind = ?"
        leased = (
            "(SELECT COUNT(*) FROM assignments a WHERE a.prompt_id = p.prompt_id AND a.expires_at > ? "
            "AND a.username <> ?)"
        )
        leased_by_others_plus_one = (
            "(SELECT COUNT(DISTINCT prompt_id) + 1 FROM assignments WHERE expires_at > ? AND username <> ?)"
        )
        done_by_caller = (
            "EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_id = p.prompt_id AND r.username = ? "
            "AND r.status IN ('submitted', 'skipped'))"
        )
        live = conn.execute(
            f"SELECT a.prompt_id, a.expires_at FROM assignments a JOIN prompts p ON p.prompt_id = a.prompt_id "
            f"JOIN projects j ON j.project_id = p.project_id "
            f"WHERE a.username = ? AND a.expires_at > ? AND {in_project} ORDER BY a.leased_at LIMIT 1",
            (username, now, project, project, kind),
        )
        draft = conn.execute(
            f"SELECT p.prompt_id, j.lease_seconds FROM rankings r JOIN prompts p ON p.prompt_id = r.prompt_id "
            f"JOIN projects j ON j.project_id = p.project_id WHERE r.username = ? AND r.status = 'draft' "
            f"AND {in_project} AND (p.gold IS NOT NULL OR p.n_submitted + {leased} < j.quorum) "
            f"ORDER BY r.updated_at DESC LIMIT 1",
            (username, project, project, kind, now, username),
        )
        neediest = conn.execute(
            f"SELECT p.prompt_id, p.n_submitted, j.quorum, j.lease_seconds, {leased} AS leased "
            f"FROM prompts p CROSS JOIN projects j WHERE j.project_id = p.project_id "
            f"AND {in_project} AND p.n_submitted < j.quorum AND p.gold IS NULL "
            f"AND NOT {done_by_caller} ORDER BY p.n_submitted, p.serve_order "
            f"LIMIT {leased_by_others_plus_one}",
            (now, username, project, project, kind, username, now, username),
        )
        items_done = (  # the caller's submitted or skipped items of this kind (and project)
            "(SELECT COUNT(*) FROM rankings r JOIN prompts rp ON rp.prompt_id = r.prompt_id "
            "JOIN projects rj ON rj.project_id = rp.project_id WHERE r.username = ? "
            "AND r.status IN ('submitted', 'skipped') AND (CAST(? AS TEXT) IS NULL OR rp.project_id = ?) "
            "AND rj.kind = ?)"
        )
        gold = conn.execute(
            f"SELECT p.prompt_id, j.gold_rate, j.lease_seconds, {items_done} AS items_done "
            f"FROM prompts p JOIN projects j ON j.project_id = p.project_id "
            f"WHERE {in_project} AND p.gold IS NOT NULL AND j.gold_rate > 0 AND NOT {done_by_caller} "
            f"ORDER BY p.serve_order, p.seq LIMIT 1",
            (username, project, project, kind, project, project, kind, username),
        )
        try:
            row = live.fetchone()
            if row is not None:
                return row["prompt_id"], row["expires_at"], False
            row = draft.fetchone()
            if row is not None:
                return row["prompt_id"], now + row["lease_seconds"], True
            best, best_taken = None, None
            for row in neediest:
                if best_taken is not None and row["n_submitted"] >= best_taken:
                    break
                taken = row["n_submitted"] + row["leased"]
                if taken < row["quorum"] and (best_taken is None or taken < best_taken):
                    best, best_taken = row, taken
            row = gold.fetchone()
            if row is not None and (
                best is None or serve_gold(username, row["items_done"], row["gold_rate"])
            ):
                best = row
            return None if best is None else (best["prompt_id"], now + best["lease_seconds"], True)
        finally:
            for cursor in (live, draft, neediest, gold):
                cursor.close()

    def release(self, username: str, prompt_id: str) -> None:
        """Give a lease back early (the prompt returns to the pool at once)."""
        with self.write() as conn:
            conn.execute(
                "DELETE FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
            )
            self._audit(conn, username, "release", prompt_id)

    def leased_candidates(self, username: str, prompt_id: str) -> list[dict]:
        """The responses of a prompt leased to the caller, read only (the lease is not renewed);
        refused like a submit when the prompt is not, or no longer, theirs."""
        self.require_user(username)
        lease = self.conn.execute(
            "SELECT expires_at FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
        ).fetchone()
        self._check_live(lease, prompt_id)
        return self._candidates(prompt_id)

    def leased_proposal(self, username: str, prompt_id: str) -> str | None:
        """The model's proposed ranking of a prompt leased to the caller, when they opted in to see
        it (None otherwise, or when it has none); refused like a submit when the prompt is not, or
        no longer, theirs."""
        self.require_user(username)
        row = self._prompt_row(self.conn, prompt_id)
        lease = self.conn.execute(
            "SELECT expires_at FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
        ).fetchone()
        self._check_live(lease, prompt_id)
        return self._shown_proposal(username, row)

    def _row_and_lease(self, conn, username: str, prompt_id: str) -> tuple[AnyRow | None, AnyRow | None]:
        """The caller's ``rankings`` row and lease for a prompt (either may be None).

        Both queries are sent before either is read: on PostgreSQL, in pipeline mode, that is
        one round trip inside the write lock instead of two.
        """
        row = conn.execute(
            "SELECT * FROM rankings WHERE prompt_id = ? AND username = ?", (prompt_id, username)
        )
        lease = conn.execute(
            "SELECT leased_at, expires_at FROM assignments WHERE prompt_id = ? AND username = ?",
            (prompt_id, username),
        )
        return row.fetchone(), lease.fetchone()

    def _check_live(self, lease: AnyRow | None, prompt_id: str) -> None:
        """Refuses a lease that is missing (``not_assigned``) or ran out (``lease_expired``)."""
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

    def save_draft(
        self,
        username: str,
        prompt_id: str,
        ranking: str = "",
        flags=None,
        comment: str = "",
        *,
        edit: str | None = None,
    ) -> bool:
        """Keep what the annotator has typed so far (any text, even a half-typed ranking, and the
        edit as typed: it is checked against the ranking on submit); renews the lease.

        Returns False, storing nothing, when the caller already submitted or skipped the prompt:
        a draft event that arrives after the submit (the page sends drafts as you type) is stale,
        not a mistake of the annotator.
        """
        ranking = check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        edit = check_text(edit, "edit", MAX_EDIT_CHARS)
        flags = check_flags(flags)
        self.require_user(username)
        row = self._prompt_row(self.conn, prompt_id)
        with self.write() as conn:
            existing, lease = self._row_and_lease(conn, username, prompt_id)
            if existing is not None and existing["status"] != "draft":
                return False
            self._check_live(lease, prompt_id)
            now = self.clock()
            conn.execute(
                "INSERT INTO rankings (prompt_id, username, status, ranking, flags_json, comment, edit, created_at,"
                " updated_at) VALUES (?, ?, 'draft', ?, ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, username) DO UPDATE SET "
                "ranking = excluded.ranking, flags_json = excluded.flags_json, comment = excluded.comment, "
                "edit = excluded.edit, updated_at = excluded.updated_at",
                (
                    prompt_id,
                    username,
                    ranking,
                    json.dumps(flags),
                    comment,
                    edit if edit.strip() else None,
                    now,
                    now,
                ),
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
        *,
        edit: str | None = None,
    ) -> SubmitResult:
        """Store a complete ranking for a leased prompt; idempotent on ``client_token``.

        ``edit``: the annotator's corrected version of the response ranked best (see
        :func:`stored_edit`)."""
        ranking = check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        edit = check_text(edit, "edit", MAX_EDIT_CHARS)
        flags = check_flags(flags)
        self.require_user(username)
        candidates = self._prompt_candidates(prompt_id)
        with self.write() as conn:
            existing, lease = self._row_and_lease(conn, username, prompt_id)
            if existing is not None and client_token and existing["client_token"] == client_token:
                return result_from_row(existing, duplicate=True)
            if existing is not None and existing["status"] != "draft":
                raise StoreError(
                    f"you have already {existing['status']} prompt {prompt_id!r}; revise it from your history instead",
                    code="already_done",
                )
            self._check_live(lease, prompt_id)
            parsed = parse_for_submit(ranking, [c["label"] for c in candidates], flags)
            edit = stored_edit(edit, parsed, candidates)
            now = self.clock()
            conn.execute(
                "INSERT INTO rankings (prompt_id, username, status, ranking, tiers_json, flags_json, comment, edit,"
                " client_token, created_at, updated_at, submitted_at, time_spent, proposal_shown, seen_proposal)"
                f" VALUES (?, ?, 'submitted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {PROPOSAL_SHOWN}, {SEEN_PROPOSAL})"
                " ON CONFLICT (prompt_id, username) DO UPDATE SET status = 'submitted', ranking = excluded.ranking,"
                " tiers_json = excluded.tiers_json, flags_json = excluded.flags_json, comment = excluded.comment,"
                " edit = excluded.edit, client_token = excluded.client_token, updated_at = excluded.updated_at,"
                " submitted_at = excluded.submitted_at, time_spent = excluded.time_spent,"
                " proposal_shown = excluded.proposal_shown, seen_proposal = excluded.seen_proposal",
                (
                    prompt_id,
                    username,
                    str(parsed),
                    json.dumps([list(t) for t in parsed.tiers]),
                    json.dumps(flags),
                    comment,
                    edit,
                    client_token,
                    now,
                    now,
                    now,
                    now - lease["leased_at"],
                    prompt_id,
                    username,
                    prompt_id,
                    username,
                ),
            )
            conn.execute("UPDATE prompts SET n_submitted = n_submitted + 1 WHERE prompt_id = ?", (prompt_id,))
            conn.execute(
                "DELETE FROM assignments WHERE prompt_id = ? AND username = ?", (prompt_id, username)
            )
            self._audit(
                conn,
                username,
                "submit",
                prompt_id,
                ranking=str(parsed),
                flags=flags,
                token=client_token,
                edited=edit is not None,
            )
        # What was just written (read back, it would cost another round trip inside the lock).
        revision = existing["revision"] if existing is not None else 0
        return SubmitResult(prompt_id, "submitted", str(parsed), flags, revision=revision)

    def skip(
        self, username: str, prompt_id: str, comment: str = "", client_token: str | None = None
    ) -> SubmitResult:
        """Decline a leased prompt: it is never offered to this annotator again and counts for nobody."""
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        self.require_user(username)
        self._prompt_row(self.conn, prompt_id)
        with self.write() as conn:
            existing, lease = self._row_and_lease(conn, username, prompt_id)
            if existing is not None and client_token and existing["client_token"] == client_token:
                return result_from_row(existing, duplicate=True)
            if existing is not None and existing["status"] != "draft":
                raise StoreError(
                    f"you have already {existing['status']} prompt {prompt_id!r}", code="already_done"
                )
            self._check_live(lease, prompt_id)
            now = self.clock()
            conn.execute(
                "INSERT INTO rankings (prompt_id, username, status, ranking, comment, client_token, created_at, updated_at,"
                " time_spent) VALUES (?, ?, 'skipped', '', ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, username) DO UPDATE SET"
                " status = 'skipped', ranking = '', tiers_json = '[]', comment = excluded.comment, edit = NULL,"
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
        *,
        edit: str | None = None,
    ) -> SubmitResult:
        """Change the caller's own submitted ranking, comment and edit (no lease needed); the old
        values go to the audit log."""
        ranking = check_text(ranking, "ranking", MAX_RANKING_CHARS)
        comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        client_token = check_text(client_token, "client token", MAX_TOKEN_CHARS) or None
        edit = check_text(edit, "edit", MAX_EDIT_CHARS)
        flags = check_flags(flags)
        self.require_user(username)
        candidates = self._prompt_candidates(prompt_id)
        with self.write() as conn:
            existing = self._existing(conn, username, prompt_id)
            if existing is None or existing["status"] != "submitted":
                raise StoreError(
                    f"you have no submitted ranking of prompt {prompt_id!r} to revise", code="not_submitted"
                )
            if client_token and existing["client_token"] == client_token:
                return result_from_row(existing, duplicate=True)
            parsed = parse_for_submit(ranking, [c["label"] for c in candidates], flags)
            edit = stored_edit(edit, parsed, candidates)
            conn.execute(
                "UPDATE rankings SET ranking = ?, tiers_json = ?, flags_json = ?, comment = ?, edit = ?,"
                " client_token = ?, updated_at = ?, revision = revision + 1 WHERE ranking_id = ?",
                (
                    str(parsed),
                    json.dumps([list(t) for t in parsed.tiers]),
                    json.dumps(flags),
                    comment,
                    edit,
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
                old_edit=existing["edit"],
                new=str(parsed),
                flags=flags,
                token=client_token,
                edited=edit is not None,
            )
        return SubmitResult(prompt_id, "submitted", str(parsed), flags, revision=existing["revision"] + 1)


def stored_edit(edit: str, ranking: Ranking, candidates: list[dict]) -> str | None:
    """What is stored of an edit of the best response: None when there is none to keep (empty,
    blank, or that response unchanged); refuses an edit when the best tier is a tie
    (``edit_needs_single_best``): it would not say which response it corrects."""
    if not edit.strip():
        return None
    best = ranking.tiers[0]
    if len(best) != 1:
        raise StoreError(
            f"an edit corrects the one response ranked best, but {' = '.join(best)} are tied at the top; "
            "rank one response first or leave the edit empty",
            code="edit_needs_single_best",
        )
    original = next(c["text"] for c in candidates if c["label"] == best[0])
    return None if edit.strip() == original.strip() else edit


def _content_hash(rec: dict, gold: str | None) -> str:
    """The digest that makes an import idempotent: the prompt, the responses and the canonical gold
    answer (a prompt without one hashes as it did before gold answers existed)."""
    content = {"prompt": rec["prompt"], "candidates": rec["candidates"]}
    if gold is not None:
        content["gold"] = gold
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()
