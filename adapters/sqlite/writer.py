"""The writer connection: its pragmas, and a whole group of appends in ONE SQL statement.

Why one statement: the writer runs on its own thread, and Python's sqlite3 lets go of
the GIL around every statement (and `executemany` around every row). Each time the
writer wants the GIL back while the event loop is busy it can wait up to the
interpreter's switch interval (5 ms). A group written as BEGIN, one `executemany` per
table and COMMIT took hundreds of such waits under load; here it is one statement into
a TEMP view whose INSTEAD OF trigger inserts the event row and, on the row that carries
it, upserts the job's read-model row. In autocommit mode that statement is its own
transaction: it commits (and fsyncs) inside the one call, or rolls back whole.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from adapters.ledger import Batch
from adapters.sqlrows import job_values

EVENT_COLUMNS = ("seq", "job_id", "version", "type", "at", "payload", "hash")
JOB_COLUMNS = ("workflow_name", "file_path", "status", "channel_name", "priority",
               "idempotency_key", "created_us", "updated_us", "created_seq", "body")
WIDTH = len(EVENT_COLUMNS) + len(JOB_COLUMNS)
NO_JOB = (None,) * len(JOB_COLUMNS)
PADDING = (None,) * WIDTH
ROWS_PER_STATEMENT_MAX = 1024

# Per connection (TEMP), so no migration: the schema of the file does not change.
# The job columns are set on the last row of each job in the group, NULL elsewhere;
# the row's seq and version are then the job's. Padding rows (seq NULL) do nothing.
SETUP = f"""
CREATE TEMP VIEW appended ({", ".join(EVENT_COLUMNS + JOB_COLUMNS)}) AS
    SELECT {", ".join(["NULL"] * WIDTH)} WHERE 0;
CREATE TEMP TRIGGER appended_row INSTEAD OF INSERT ON appended
WHEN NEW.seq IS NOT NULL BEGIN
    INSERT INTO events (seq, job_id, version, type, at, payload, hash)
    VALUES (NEW.seq, NEW.job_id, NEW.version, NEW.type, NEW.at, NEW.payload, NEW.hash);
    INSERT INTO jobs (id, workflow_name, file_path, status, channel_name, priority,
                      idempotency_key, created_us, updated_us, created_seq, seq, version, body)
    SELECT NEW.job_id, NEW.workflow_name, NEW.file_path, NEW.status, NEW.channel_name,
           NEW.priority, NEW.idempotency_key, NEW.created_us, NEW.updated_us,
           NEW.created_seq, NEW.seq, NEW.version, NEW.body
    WHERE NEW.body IS NOT NULL
    ON CONFLICT (id) DO UPDATE SET
        status = excluded.status, channel_name = excluded.channel_name,
        priority = excluded.priority, updated_us = excluded.updated_us, seq = excluded.seq,
        version = excluded.version, body = excluded.body;
END;
"""


def connect_writer(path: Path) -> sqlite3.Connection:
    """The writer's connection, with its durability pragmas set explicitly."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before append returns
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def prepare_writer(conn: sqlite3.Connection) -> None:
    """Create the connection's TEMP view and trigger (after the migrations ran)."""
    conn.executescript(SETUP)


class GroupStatements:
    """The INSERT statements of a connection, one per padded row count."""

    def __init__(self, conn: sqlite3.Connection, rows_max: int = ROWS_PER_STATEMENT_MAX) -> None:
        variables_max = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.rows_max = max(1, min(rows_max, variables_max // WIDTH))
        # Few distinct texts, so sqlite3's statement cache keeps every one prepared.
        self.sizes = _bucket_sizes(self.rows_max)
        self._sql: dict[int, str] = {}

    def sql(self, rows: int) -> str:
        """The statement for `rows` rows (a bucket size)."""
        text = self._sql.get(rows)
        if text is None:
            values = "(" + ", ".join(["?"] * WIDTH) + ")"
            text = self._sql[rows] = f"INSERT INTO appended VALUES {', '.join([values] * rows)}"
        return text

    def bucket(self, rows: int) -> int:
        """The smallest statement size that holds `rows` rows (rows <= rows_max)."""
        for size in self.sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows is over {self.rows_max} per statement")


def write_batch(conn: sqlite3.Connection, statements: GroupStatements, batch: Batch) -> None:
    """Insert a prepared batch's events and read-model rows in one transaction."""
    params = batch_params(batch)
    rows = len(batch.rows)
    if rows <= statements.rows_max:
        _insert(conn, statements, params, rows)  # autocommit: its own transaction
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for start in range(0, rows, statements.rows_max):
            count = min(statements.rows_max, rows - start)
            _insert(conn, statements, params[start * WIDTH : (start + count) * WIDTH], count)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def batch_params(batch: Batch) -> list[object]:
    """The batch's rows, flat, WIDTH values per event, job columns on each job's last row."""
    last_of_job = {job.seq: job for job in batch.jobs.values()}
    params: list[object] = []
    extend = params.extend
    for row in batch.rows:
        stored = row.stored
        extend((stored.seq, stored.job_id, stored.version, row.type_tag,
                stored.event.at.isoformat(), row.payload.decode(), stored.hash))
        job = last_of_job.get(stored.seq)
        extend(NO_JOB if job is None else job_values(job))
    return params


def _insert(conn: sqlite3.Connection, statements: GroupStatements, params: list[object],
            rows: int) -> None:
    size = statements.bucket(rows)
    if size > rows:
        params = params + list(PADDING * (size - rows))
    conn.execute(statements.sql(size), params)


def _bucket_sizes(rows_max: int) -> list[int]:
    sizes, size = [], 1
    while size < rows_max:
        sizes.append(size)
        size = max(size + 1, size * 3 // 2)
    return [*sizes, rows_max]
