"""The SQLite log's schema and its migrations (see docs/decisions/0002-log-schema.md).

Migrations are append-only: a released script is never edited. `user_version`
records how many have run; opening an older file runs the rest in one
transaction each.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: the log, the job read model and the store's own facts.
    """
    CREATE TABLE events (
        seq      INTEGER PRIMARY KEY,          -- global order, gapless, assigned by the writer
        job_id   TEXT    NOT NULL,
        version  INTEGER NOT NULL,             -- per job, from 1
        type     TEXT    NOT NULL,             -- the event's tag, e.g. job.created
        at       TEXT    NOT NULL,             -- RFC 3339 UTC, for humans reading the file
        payload  TEXT    NOT NULL,             -- the event as JSON, exactly as hashed
        hash     TEXT    NOT NULL,             -- sha256(prev_hash + canonical bytes), hex
        UNIQUE (job_id, version)
    );
    CREATE TABLE jobs (
        id              TEXT PRIMARY KEY,
        workflow_name   TEXT    NOT NULL,
        file_path       TEXT    NOT NULL,
        status          TEXT    NOT NULL,
        channel_name    TEXT,
        priority        INTEGER NOT NULL,
        idempotency_key TEXT,
        created_us      INTEGER NOT NULL,      -- created_at, microseconds since the epoch
        updated_us      INTEGER NOT NULL,
        created_seq     INTEGER NOT NULL,
        seq             INTEGER NOT NULL,      -- the last event this row reflects
        version         INTEGER NOT NULL,
        body            TEXT    NOT NULL       -- the whole Job as JSON
    );
    CREATE UNIQUE INDEX jobs_one_active_per_file ON jobs (workflow_name, file_path)
        WHERE status IN ('pending', 'running');
    CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (workflow_name, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_by_created ON jobs (created_seq);
    CREATE INDEX jobs_by_status ON jobs (status, created_seq);
    CREATE INDEX jobs_by_workflow ON jobs (workflow_name, created_seq);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: consumers of the log (notifiers) keep their delivered position here;
    #    channel listings get their own index.
    """
    CREATE TABLE checkpoints (
        name       TEXT PRIMARY KEY,
        seq        INTEGER NOT NULL,
        updated_at TEXT    NOT NULL
    );
    CREATE INDEX jobs_by_channel ON jobs (channel_name, created_seq);
    """,
    # 3: notifications: deliveries that never succeeded, and the alerts that fired.
    """
    CREATE TABLE dead_letters (
        id         INTEGER PRIMARY KEY,
        target     TEXT    NOT NULL,
        seq        INTEGER NOT NULL,
        job_id     TEXT    NOT NULL,
        event_type TEXT    NOT NULL,
        attempts   INTEGER NOT NULL,
        last_error TEXT    NOT NULL,
        created_at TEXT    NOT NULL,
        UNIQUE (target, seq)
    );
    CREATE TABLE alerts (
        id     INTEGER PRIMARY KEY,
        rule   TEXT NOT NULL,
        state  TEXT NOT NULL,
        at     TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    """,
    # 4: every job of a file, for reconciliation (the unique index covers active jobs only).
    """
    CREATE INDEX jobs_by_file ON jobs (workflow_name, file_path, created_seq)
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The file was written by a newer multiflow than this one."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION; returns the version it had before."""
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the log has schema {found}, this multiflow knows up to {SCHEMA_VERSION}: upgrade it"
        )
    for number in range(found + 1, SCHEMA_VERSION + 1):
        apply_migration(conn, number)
    return int(found)


def apply_migration(conn: sqlite3.Connection, number: int) -> None:
    """Run migration `number` (1-based) and record it, in one transaction."""
    statements = [s.strip() for s in MIGRATIONS[number - 1].split(";") if s.strip()]
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
