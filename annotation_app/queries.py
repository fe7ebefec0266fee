"""The store's read-only queries: accounts and roles, prompts, the caller's own rows, admin views.

:class:`StoreQueries` is a base class of :class:`annotation_app.store.Store`, which adds the
connection handling and every operation that writes; a query only reads through ``self.conn``
(this thread's connection: inside a write transaction, that transaction's) and never opens a
transaction of its own. The SQL runs unchanged on SQLite and PostgreSQL
(:mod:`annotation_app.database`): a parameter that may be NULL on its own, as in
``? IS NULL``, is written ``CAST(? AS TEXT)``, since PostgreSQL must know every parameter's type.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from annotation_app import auth
from annotation_app.database import AnyRow, PostgresConnection, SQLiteConnection
from annotation_app.errors import StoreError
from annotation_app.records import Item
from annotation_app.schema import schema_version
from annotation_app.validation import MAX_PROMPT_ID_CHARS

# Prompts whose responses one process keeps in memory (see StoreQueries._candidates).
CACHED_PROMPTS = 10_000


class StoreQueries:
    """Read-only queries over the annotation database (see :class:`annotation_app.store.Store`)."""

    conn: SQLiteConnection | PostgresConnection  # provided by Store
    clock: Callable[[], float]
    _candidate_rows: dict[str, tuple]  # provided by Store: prompt id -> its candidates' rows
    _known_users: set[str]  # provided by Store: user names found by require_user

    # -- schema

    def schema_version(self) -> int:
        return schema_version(self.conn)

    def integrity_check(self) -> str:
        """``"ok"``, or the first problem: the database's own check of its storage
        (:meth:`~annotation_app.database.SQLiteConnection.storage_check`), then the store's
        bookkeeping (each prompt's count of submitted rankings agrees with its rankings)."""
        conn = self.conn
        storage = conn.storage_check()
        if storage != "ok":
            return storage
        wrong = conn.execute(
            "SELECT p.prompt_id, p.n_submitted, COUNT(r.prompt_id) AS n FROM prompts p LEFT JOIN rankings r "
            "ON r.prompt_id = p.prompt_id AND r.status = 'submitted' GROUP BY p.prompt_id, p.n_submitted "
            "HAVING p.n_submitted <> COUNT(r.prompt_id) ORDER BY p.prompt_id LIMIT 1"
        ).fetchone()
        if wrong is not None:
            return (
                f"prompt {wrong['prompt_id']!r} counts {wrong['n_submitted']} submitted rankings "
                f"but has {wrong['n']}"
            )
        return "ok"

    # -- users

    def verify_password(self, username: str, password: str) -> bool:
        """True when the pair is valid. Spends the same KDF time for unknown users (no user probing)."""
        if not auth.plausible_login(username, password):
            return False
        row = self.conn.execute(
            "SELECT kdf, salt, pw_hash FROM annotators WHERE username = ?", (username,)
        ).fetchone()
        return auth.password_matches(password, row)

    def role(self, username: str | None) -> str | None:
        if not username:
            return None
        row = self.conn.execute("SELECT role FROM annotators WHERE username = ?", (username,)).fetchone()
        return row["role"] if row else None

    def shows_proposals(self, username: str) -> bool:
        """Whether the annotator opted into seeing a model's proposed ranking (off by default)."""
        row = self.conn.execute(
            "SELECT show_proposals FROM annotators WHERE username = ?", (username,)
        ).fetchone()
        return bool(row is not None and row["show_proposals"])

    def require_user(self, username: str | None) -> str:
        """``username`` if it is an account. Accounts are never deleted, so a name once found is
        remembered: every ranking call checks it, and on PostgreSQL a check is a round trip."""
        if username in self._known_users:
            return username  # type: ignore[return-value]
        if self.role(username) is None:
            raise StoreError("you are not logged in as a known user; log in again", code="unknown_user")
        self._known_users.add(username)  # type: ignore[arg-type]
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

    def project(self, project_id: str) -> dict:
        row = self.conn.execute("SELECT * FROM projects WHERE project_id = ?", (project_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown project {project_id!r}", code="unknown_project")
        return dict(row)

    def projects(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM projects ORDER BY created_at")]

    def max_k(self) -> int:
        """The largest number of candidates of any stored prompt (0 when there are none)."""
        row = self.conn.execute(
            "SELECT MAX(n) AS k FROM (SELECT COUNT(*) AS n FROM candidates GROUP BY prompt_id) AS counts"
        ).fetchone()
        return int(row["k"] or 0)

    def _candidates(self, prompt_id: str) -> list[dict]:
        """A prompt's responses in label order (``[]`` for an unknown prompt), new dicts each call.

        They never change once imported (``add_items`` refuses different content and nothing
        deletes a prompt), so each process keeps them after the first read: ranking a prompt
        then reads none of it from the database (on PostgreSQL, a round trip saved per call).
        """
        rows = self._candidate_rows.get(prompt_id)
        if rows is None:
            rows = tuple(
                (r["label"], r["text"], r["model"], r["gen_json"])
                for r in self.conn.execute(
                    "SELECT label, text, model, gen_json FROM candidates WHERE prompt_id = ? ORDER BY label",
                    (prompt_id,),
                )
            )
            if rows:
                if len(self._candidate_rows) >= CACHED_PROMPTS:
                    self._candidate_rows.clear()  # bounded memory; starting over is good enough
                self._candidate_rows[prompt_id] = rows
        return [
            {"label": label, "text": text, "model": model, "gen": json.loads(gen)}
            for label, text, model, gen in rows
        ]

    def _prompt_candidates(self, prompt_id) -> list[dict]:
        """The responses of a stored prompt; an unknown prompt id is refused (``unknown_prompt``)."""
        _check_prompt_id(prompt_id)
        candidates = self._candidates(prompt_id)
        if not candidates:
            raise StoreError(f"unknown prompt {prompt_id!r}", code="unknown_prompt")
        return candidates

    def _prompt_row(self, conn, prompt_id) -> AnyRow:
        _check_prompt_id(prompt_id)
        row = conn.execute(
            "SELECT p.*, j.quorum, j.guidelines, j.lease_seconds, j.kind FROM prompts p "
            "JOIN projects j ON j.project_id = p.project_id WHERE p.prompt_id = ?",
            (prompt_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"unknown prompt {prompt_id!r}", code="unknown_prompt")
        return row

    def _item(self, conn, username: str, prompt_id: str, expires_at: float) -> Item:
        row = self._prompt_row(conn, prompt_id)
        draft = conn.execute(
            "SELECT ranking, flags_json, comment, edit FROM rankings WHERE prompt_id = ? AND username = ? "
            "AND status = 'draft'",
            (prompt_id, username),
        ).fetchone()
        return Item(
            prompt_id=prompt_id,
            project=row["project_id"],
            prompt=row["prompt_text"],
            conversation=_conversation(row["prompt_json"]),
            candidates=[{"label": c["label"], "text": c["text"]} for c in self._candidates(prompt_id)],
            lease_expires_at=expires_at,
            guidelines=row["guidelines"],
            proposal=self._shown_proposal(username, row),
            draft=None
            if draft is None
            else {
                "ranking": draft["ranking"],
                "flags": json.loads(draft["flags_json"]),
                "comment": draft["comment"],
                **_edit_fields(draft["edit"]),
            },
        )

    def _shown_proposal(self, username: str, prompt_row: AnyRow) -> str | None:
        """The model's proposed ranking of the prompt (``_prompt_row``) as the caller may see it: only
        on the ranking screen, and only when they opted in (:meth:`shows_proposals`); else None.
        Store.submit records the same condition as the ranking's ``proposal_shown``."""
        if prompt_row["proposal"] is None or prompt_row["kind"] != "ranking":
            return None  # no read of the caller's preference when there is nothing to show
        return prompt_row["proposal"] if self.shows_proposals(username) else None

    def _existing(self, conn, username: str, prompt_id: str) -> AnyRow | None:
        return conn.execute(
            "SELECT * FROM rankings WHERE prompt_id = ? AND username = ?", (prompt_id, username)
        ).fetchone()

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
            **_edit_fields(row["edit"], json.loads(row["tiers_json"])),
        }

    def progress(self, username: str, kind: str = "ranking") -> dict:
        """The caller's counts (submitted, skipped, drafts) and the prompts still needing rankings,
        among projects of ``kind``: the ranking screen counts ranking items, the arena its pairs."""
        conn = self.conn
        mine = {
            r["status"]: r["n"]
            for r in conn.execute(
                "SELECT r.status, COUNT(*) AS n FROM rankings r JOIN prompts p ON p.prompt_id = r.prompt_id "
                "JOIN projects j ON j.project_id = p.project_id WHERE r.username = ? AND j.kind = ? "
                "GROUP BY r.status",
                (username, kind),
            )
        }
        total = conn.execute(
            "SELECT COUNT(*) AS n FROM prompts p JOIN projects j ON j.project_id = p.project_id WHERE j.kind = ?",
            (kind,),
        ).fetchone()["n"]
        # Gold items are outside the quorum (Store._choose): they never "need" rankings.
        open_ = conn.execute(
            "SELECT COUNT(*) AS n FROM prompts p JOIN projects j ON j.project_id = p.project_id "
            "WHERE p.n_submitted < j.quorum AND p.gold IS NULL AND j.kind = ?",
            (kind,),
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
        """Progress per annotator and per prompt, time per item (admin). A prompt's ``gold`` is
        its known answer (None: not a gold item); gold items are outside the quorum, so
        ``complete_prompts`` counts the others only."""
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
                "SELECT p.prompt_id, p.project_id, j.quorum, p.gold, "
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
            "complete_prompts": sum(
                1 for p in per_prompt if p["gold"] is None and p["submitted"] >= p["quorum"]
            ),
            "submitted": sum(p["submitted"] for p in per_prompt),
            "median_seconds_per_item": times[len(times) // 2] if times else math.nan,
        }

    def proposals(self, project: str | None = None) -> dict[str, dict]:
        """``{prompt_id: {"ranking", "source"}}`` of every prompt with a model's proposed ranking (admin)."""
        rows = self.conn.execute(
            "SELECT prompt_id, proposal, proposal_source FROM prompts WHERE proposal IS NOT NULL "
            "AND (CAST(? AS TEXT) IS NULL OR project_id = ?) ORDER BY seq",
            (project, project),
        ).fetchall()
        return {r["prompt_id"]: {"ranking": r["proposal"], "source": r["proposal_source"]} for r in rows}

    def gold_answers(self, project: str | None = None) -> dict[str, str]:
        """``{prompt_id: known answer}`` (canonical ranking text) of every gold item of ``project``
        (None: all) (admin: annotators must never see these)."""
        rows = self.conn.execute(
            "SELECT prompt_id, gold FROM prompts WHERE gold IS NOT NULL "
            "AND (CAST(? AS TEXT) IS NULL OR project_id = ?) ORDER BY seq",
            (project, project),
        ).fetchall()
        return {r["prompt_id"]: r["gold"] for r in rows}

    def prompts_for_proposal(self, project: str | None = None) -> list[dict]:
        """Every prompt with its responses, as a scorer needs them: ``prompt`` (text or messages),
        ``candidates`` (label, text)."""
        rows = self.conn.execute(
            "SELECT prompt_id, prompt_json FROM prompts WHERE (CAST(? AS TEXT) IS NULL OR project_id = ?) ORDER BY seq",
            (project, project),
        ).fetchall()
        return [
            {
                "prompt_id": r["prompt_id"],
                "prompt": json.loads(r["prompt_json"]),
                "candidates": self._candidates(r["prompt_id"]),
            }
            for r in rows
        ]

    def submitted_rankings(self, project: str | None = None, kind: str | None = None) -> list[dict]:
        """Every submitted ranking in the rankings contract (admin export), of ``project`` (None:
        all) and of projects of ``kind`` (``ranking``, ``arena``; None: both). An arena vote is a
        ranking of two responses (``A > B``, ``A = B`` or ``B > A``) whose candidates name their
        ``model``. ``proposal_shown``: True when the annotator saw the model's proposed ranking as
        they submitted, False when not, None when the prompt had no proposal then;
        ``seen_proposal``: that proposed ranking when it was shown (None otherwise, and for
        rankings stored before the store kept it)."""
        conn = self.conn
        rows = conn.execute(
            "SELECT r.*, p.prompt_json, p.project_id FROM rankings r JOIN prompts p ON p.prompt_id = r.prompt_id "
            "JOIN projects j ON j.project_id = p.project_id "
            "WHERE r.status = 'submitted' AND (CAST(? AS TEXT) IS NULL OR p.project_id = ?) "
            "AND (CAST(? AS TEXT) IS NULL OR j.kind = ?) ORDER BY p.seq, r.username",
            (project, project, kind, kind),
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
                    # whether the annotator saw a model's proposed ranking (None: none existed then)
                    "proposal_shown": None if r["proposal_shown"] is None else bool(r["proposal_shown"]),
                    "seen_proposal": r["seen_proposal"],
                    **_edit_fields(r["edit"], json.loads(r["tiers_json"])),
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


def _check_prompt_id(prompt_id) -> None:
    if not isinstance(prompt_id, str) or len(prompt_id) > MAX_PROMPT_ID_CHARS:
        raise StoreError("unknown prompt id", code="unknown_prompt")


def _edit_fields(edit: str | None, tiers: list[list[str]] | None = None) -> dict:
    """``{"edit", "edit_of"}`` of a row with an edit (``edit_of``: the label of the response it
    corrects, the best tier's only one; a draft's ranking may not say yet), ``{}`` without."""
    if edit is None:
        return {}
    if tiers and len(tiers[0]) == 1:
        return {"edit": edit, "edit_of": tiers[0][0]}
    return {"edit": edit}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _conversation(prompt_json: str) -> list[dict] | None:
    """The messages of a multi-turn prompt (the prompts contract's list form), None for plain text."""
    prompt = json.loads(prompt_json)
    return prompt if isinstance(prompt, list) else None
