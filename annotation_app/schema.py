"""The annotation database's tables and their migrations, one schema for SQLite and PostgreSQL.

The statements are written in SQLite's spelling and run through the connection's ``ddl`` (which
maps the few type names that differ, :mod:`annotation_app.database`); what cannot be spelled the
same way on both, the append-only triggers, comes from the connection's ``append_only``.

Tables: ``annotators`` (accounts, scrypt hashes), ``projects`` (quorum, guidelines, lease
length), ``prompts`` and ``candidates`` (what is ranked), ``assignments`` (leases), ``rankings``
(one row per prompt and annotator: draft, submitted or skipped; since v4 with the annotator's
``edit`` of the best response, since v7 with whether a model's proposal was shown, since v9 with
the proposed ranking shown) and
``audit_log`` (append-only, enforced by triggers).
``schema_version`` records every migration applied.

:data:`MIGRATIONS` is append-only: a database made by any released version opens unchanged and
is brought up to :data:`SCHEMA_VERSION` by :func:`migrate`, one transaction per step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from annotation_app.errors import StoreError

if TYPE_CHECKING:  # only for the annotations: store.py imports this module
    from annotation_app.database import PostgresConnection, SQLiteConnection
    from annotation_app.store import Store

    Connection = SQLiteConnection | PostgresConnection

# The values the tables' CHECK constraints allow.
ROLES = ("annotator", "admin")
PROJECT_KINDS = ("ranking", "arena")  # since v6: what a project's items ask for
STATUSES = ("draft", "submitted", "skipped")
DEFAULT_LEASE_SECONDS = 30 * 60  # the projects.lease_seconds default (migration 2)


def _run(conn: Connection, statements: list[str]) -> None:
    # One statement at a time: ``executescript`` would COMMIT the surrounding BEGIN IMMEDIATE.
    for stmt in statements:
        conn.execute(conn.ddl(stmt))


def _v1(conn: Connection) -> None:
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


def _v2(conn: Connection) -> None:
    # v2: per-project lease length, time spent per item, revision counter, and an append-only
    # audit log enforced by the database itself (triggers; their SQL is each database's own).
    _run(
        conn,
        [
            f"ALTER TABLE projects ADD COLUMN lease_seconds INTEGER NOT NULL DEFAULT {DEFAULT_LEASE_SECONDS}",
            "ALTER TABLE rankings ADD COLUMN time_spent REAL",
            "ALTER TABLE rankings ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE rankings ADD COLUMN submitted_at REAL",
            "UPDATE rankings SET submitted_at = updated_at WHERE status = 'submitted'",
            *conn.append_only("audit_log"),
            "CREATE INDEX assignments_by_user ON assignments (username, expires_at)",
        ],
    )


def _v3(conn: Connection) -> None:
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


def _v4(conn: Connection) -> None:
    # v4: the annotator's corrected version of the response they ranked best (NULL: no edit).
    _run(conn, ["ALTER TABLE rankings ADD COLUMN edit TEXT"])


def _v5(conn: Connection) -> None:
    # v5: a model's proposed ranking of each prompt (pre-annotation) and what proposed it; shown
    # to admins only, to measure how well a model could pre-rank (NULL: none proposed).
    _run(
        conn,
        [
            "ALTER TABLE prompts ADD COLUMN proposal TEXT",
            "ALTER TABLE prompts ADD COLUMN proposal_source TEXT",
        ],
    )


def _v6(conn: Connection) -> None:
    # v6, three additions that share the prompt-choosing query:
    # - projects.kind: 'ranking' (rank K responses) or 'arena' (vote on two policies' responses,
    #   blind; docs/arena.md); each tab of the app serves its own kind.
    # - gold items: prompts.gold holds a known answer (a full or partial ranking; NULL: none) and
    #   projects.gold_rate the share of an annotator's items drawn from them, unannounced.
    # - active selection: prompts.serve_order, the order prompts with equally many rankings are
    #   served in (import order until `rlhf annotate prioritize` puts the least certain first);
    #   the need index follows it.
    _run(
        conn,
        [
            "ALTER TABLE projects ADD COLUMN kind TEXT NOT NULL DEFAULT 'ranking' CHECK (kind IN ('ranking', 'arena'))",
            "ALTER TABLE projects ADD COLUMN gold_rate REAL NOT NULL DEFAULT 0 CHECK (gold_rate >= 0 AND gold_rate <= 1)",
            "ALTER TABLE prompts ADD COLUMN gold TEXT",
            "ALTER TABLE prompts ADD COLUMN serve_order INTEGER",
            "UPDATE prompts SET serve_order = seq",
            "DROP INDEX prompts_by_need",
            "CREATE INDEX prompts_by_need ON prompts (n_submitted, serve_order)",
        ],
    )


def _v7(conn: Connection) -> None:
    # v7: pre-annotation opt-in. annotators.show_proposals: the annotator chose to see the model's
    # proposed ranking (prompts.proposal) on the ranking screen (0 by default: no anchoring).
    # rankings.proposal_shown: whether that proposal was shown when the ranking was submitted (1/0;
    # NULL: no proposal then), so the dashboard can tell anchored agreement from independent.
    _run(
        conn,
        [
            "ALTER TABLE annotators ADD COLUMN show_proposals INTEGER NOT NULL DEFAULT 0 "
            "CHECK (show_proposals IN (0, 1))",
            "ALTER TABLE rankings ADD COLUMN proposal_shown INTEGER CHECK (proposal_shown IN (0, 1))",
        ],
    )


def _v8(conn: Connection) -> None:
    # v8: in a project that serves gold items, every choice of a next item looks for the first gold
    # item in serve order; without an index that is a scan and a sort of every prompt (3.7 ms per
    # call at 20 k prompts, 0.4 ms with it: experiments/benchmarks/bench_store_choice.py). The
    # partial index holds only the gold items, which are few, in serve order.
    _run(conn, ["CREATE INDEX prompts_gold ON prompts (serve_order, seq) WHERE gold IS NOT NULL"])


def _v9(conn: Connection) -> None:
    # v9: rankings.seen_proposal, the proposed ranking the annotator saw as they submitted (NULL:
    # none shown). prompts.proposal is replaced whenever `rlhf annotate propose` runs again (every
    # round of an active-learning loop), so without a copy the dashboard would judge anchoring
    # against a proposal nobody saw.
    _run(conn, ["ALTER TABLE rankings ADD COLUMN seen_proposal TEXT"])


# Append-only list: (version, migration). Never edit a released step; add a new one.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _v1),
    (2, _v2),
    (3, _v3),
    (4, _v4),
    (5, _v5),
    (6, _v6),
    (7, _v7),
    (8, _v8),
    (9, _v9),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: Connection) -> int:
    """The highest migration applied to the database (0 for a new, empty one)."""
    if not conn.table_exists("schema_version"):
        return 0
    row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
    return int(row["v"] or 0)


def migrate(store: Store) -> int:
    """Bring ``store``'s database to :data:`SCHEMA_VERSION`, one transaction per step; return it."""
    with store.write() as conn:
        conn.execute(
            conn.ddl(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)"
            )
        )
    current = schema_version(store.conn)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"{store.db.name} has schema version {current}, newer than this program's {SCHEMA_VERSION}; "
            "upgrade rlhf-lab",
            code="schema_too_new",
        )
    for version, step in MIGRATIONS:
        if version <= current:
            continue
        with store.write() as conn:
            # Re-check inside the lock: another process may have migrated meanwhile.
            row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
            if int(row["v"] or 0) >= version:
                continue
            step(conn)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, store.clock())
            )
            write_audit(conn, store.clock(), None, "migrate", None, version=version)
    return schema_version(store.conn)


def write_audit(
    conn: Connection, at: float, username: str | None, action: str, prompt_id: str | None, **detail
) -> None:
    """Append one entry to ``audit_log`` (the table refuses updates and deletes)."""
    conn.execute(
        "INSERT INTO audit_log (at, username, action, prompt_id, detail) VALUES (?, ?, ?, ?, ?)",
        (at, username, action, prompt_id, json.dumps(detail, sort_keys=True)),
    )
