"""The PostgreSQL log's schema and migrations (the same shape as the SQLite one).

Payloads are `text`, not `jsonb`: the hash chain is over the stored bytes, and
text survives a copy between stores byte for byte. `seq` is assigned by the
appender under a table lock, never by a sequence (sequences are not
transactional: a reader could see N+1 before N commits and skip N for ever).
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq      BIGINT PRIMARY KEY,
        job_id   TEXT    NOT NULL,
        version  INTEGER NOT NULL,
        type     TEXT    NOT NULL,
        at       TEXT    NOT NULL,
        payload  TEXT    NOT NULL,
        hash     TEXT    NOT NULL,
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
        created_us      BIGINT  NOT NULL,
        updated_us      BIGINT  NOT NULL,
        created_seq     BIGINT  NOT NULL,
        seq             BIGINT  NOT NULL,
        version         INTEGER NOT NULL,
        body            TEXT    NOT NULL
    );
    CREATE UNIQUE INDEX jobs_one_active_per_file ON jobs (workflow_name, file_path)
        WHERE status IN ('pending', 'running');
    CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (workflow_name, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_by_created ON jobs (created_seq);
    CREATE INDEX jobs_by_status ON jobs (status, created_seq);
    CREATE INDEX jobs_by_workflow ON jobs (workflow_name, created_seq);
    CREATE INDEX jobs_by_channel ON jobs (channel_name, created_seq);
    CREATE TABLE checkpoints (
        name       TEXT PRIMARY KEY,
        seq        BIGINT NOT NULL,
        updated_at TEXT   NOT NULL
    );
    CREATE TABLE dead_letters (
        id         BIGSERIAL PRIMARY KEY,
        target     TEXT    NOT NULL,
        seq        BIGINT  NOT NULL,
        job_id     TEXT    NOT NULL,
        event_type TEXT    NOT NULL,
        attempts   INTEGER NOT NULL,
        last_error TEXT    NOT NULL,
        created_at TEXT    NOT NULL,
        UNIQUE (target, seq)
    );
    CREATE TABLE alerts (
        id     BIGSERIAL PRIMARY KEY,
        rule   TEXT NOT NULL,
        state  TEXT NOT NULL,
        at     TEXT NOT NULL,
        detail TEXT NOT NULL
    )
    """,
    # 2: every job of a file, for reconciliation (the unique index covers active jobs only).
    """
    CREATE INDEX jobs_by_file ON jobs (workflow_name, file_path, created_seq)
    """,
    # 3: several nodes. Which node appended each event (outside the hash: the chain is the
    # same whoever wrote it), each node's lease, and the cluster-wide leases of singletons.
    """
    ALTER TABLE events ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE TABLE nodes (
        node_id      TEXT PRIMARY KEY,
        host         TEXT        NOT NULL,
        pid          INTEGER     NOT NULL,
        started_at   TIMESTAMPTZ NOT NULL,
        heartbeat_at TIMESTAMPTZ NOT NULL,
        lease_until  TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        holder      TEXT        NOT NULL,
        lease_until TIMESTAMPTZ NOT NULL
    )
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
META_TABLE = "CREATE TABLE IF NOT EXISTS multiflow_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
