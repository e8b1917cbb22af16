"""`multiflow rebuild`: empty the job read model and fold the whole log back into it.

Two threads share the work. This one reads the log and folds it (adapters/sqlite/
fastfold.py, checked against the kernel's fold by a property test); the other owns the
writer connection and inserts the finished rows, up to 1,024 rows per statement. A
statement per many rows instead of `executemany` matters: sqlite3 takes the GIL back
after every statement it steps, and a writer thread that needs the GIL once per row
waits for the folding thread (up to the 5 ms switch interval) at every row.

The indexes stay: rows arrive roughly in creation order, so most index inserts append,
and their cost runs beside the fold instead of after it. Only unfinished jobs stay in
memory.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import msgspec

from adapters.sqlite.fastfold import FastFold
from adapters.sqlite.foldrows import Row, RowMaker
from adapters.sqlrows import JOB_COLUMNS, UPSERT_JOB, job_decoder
from kernel.state import Job

CHUNK_EVENTS = 5_000
HELD_JOBS_MIN = 5_000  # finished jobs go to the writer once this many jobs are held
ROWS_PER_STATEMENT_MAX = 1024
_WIDTH = len(JOB_COLUMNS.split(","))
_VALUES = "(" + ", ".join(["?"] * _WIDTH) + ")"
_UPSERT = UPSERT_JOB[UPSERT_JOB.index(" ON CONFLICT"):]


class RebuildReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a rebuild replayed, and how fast."""

    events: int
    jobs: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        """Replay speed."""
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def rebuild_read_model(conn: sqlite3.Connection, path: Path) -> RebuildReport:
    """Replace the `jobs` table with the fold of `events`, in one transaction on `conn`."""
    started = time.perf_counter()
    reader = sqlite3.connect(path)  # its own connection: reads while `conn` writes (WAL)
    try:
        with _gc_paused(), _secure_delete_off(conn):
            conn.execute("BEGIN IMMEDIATE")
            try:
                events, jobs = _fold_into(conn, reader)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        reader.close()
    return RebuildReport(events=events, jobs=jobs, seconds=time.perf_counter() - started)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # The fold makes no reference cycles, so refcounting frees all it drops; the cyclic
    # collector would only rescan the chunks and the held jobs, thousands of times (a
    # third of the fold's time when measured). Cycles made elsewhere wait a few seconds.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _secure_delete_off(conn: sqlite3.Connection) -> Iterator[None]:
    # Debian's SQLite zeroes every freed page (SECURE_DELETE): emptying the table would
    # write all of it once more. The rows dropped are folds of the log kept in the same
    # file, so overwriting them hides nothing.
    (before,) = conn.execute("PRAGMA secure_delete").fetchone()
    conn.execute("PRAGMA secure_delete = 0")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA secure_delete = {int(before)}")


def _fold_into(conn: sqlite3.Connection, reader: sqlite3.Connection) -> tuple[int, int]:
    with _RowWriter(conn) as writer:
        fold, rows = FastFold(lambda job_id: _written_job(conn, writer, job_id)), RowMaker()
        cursor = reader.execute("SELECT seq, version, payload FROM events ORDER BY seq")
        events, held_max = 0, HELD_JOBS_MIN
        while chunk := cursor.fetchmany(CHUNK_EVENTS):
            fold.fold(chunk)
            events += len(chunk)
            if len(fold.jobs) >= held_max:
                writer.put(rows.rows(fold.take_finished()))
                held_max = max(HELD_JOBS_MIN, 2 * len(fold.jobs))  # linear with many active
        writer.put(rows.rows(fold.take_all()))
    return events, fold.created


def _written_job(conn: sqlite3.Connection, writer: _RowWriter, job_id: str) -> Job | None:
    # A finished job handed to the writer has more events (an operator's retry, a dropped
    # duplicate): once the writer has written everything, read it back.
    writer.sync()
    row = conn.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else job_decoder.decode(row[0])


def write_rows(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Insert (or update) rows, as few statements as the variable limit allows."""
    per_statement = min(ROWS_PER_STATEMENT_MAX,
                        conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _WIDTH)
    start = 0
    while start < len(rows):
        # Statements of a few sizes only (powers of two), so sqlite3 keeps them prepared.
        count = min(per_statement, 1 << ((len(rows) - start).bit_length() - 1))
        conn.execute(_insert_sql(count),
                     list(itertools.chain.from_iterable(rows[start:start + count])))
        start += count


@functools.cache
def _insert_sql(rows: int) -> str:
    return f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES {', '.join([_VALUES] * rows)}{_UPSERT}"


class _RowWriter:
    """A thread that owns `conn` while the fold runs: empties the table, writes the rows."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.batches: queue.Queue[list[Row] | str | None] = queue.Queue(maxsize=3)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="rebuild-writer", daemon=True)

    def __enter__(self) -> _RowWriter:
        self.batches.put("DELETE FROM jobs")  # runs beside the first chunks of the fold
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.batches.put(None)
        self.thread.join()
        if exc is None:
            self._check()

    def put(self, rows: list[Row]) -> None:
        """Queue a batch of rows; raises what the writer met so far."""
        self._check()
        if rows:
            self.batches.put(rows)

    def sync(self) -> None:
        """Wait until the table is emptied and every queued row written."""
        self.batches.join()
        self._check()

    def _check(self) -> None:
        if self.failure:
            raise self.failure[0]

    def _run(self) -> None:
        while (work := self.batches.get()) is not None:
            self._write(work)
            self.batches.task_done()
        self.batches.task_done()

    def _write(self, work: list[Row] | str) -> None:
        if self.failure:  # after a failure, drain: the folding thread must never block
            return
        try:
            if isinstance(work, str):
                self.conn.execute(work)
            else:
                write_rows(self.conn, work)
        except BaseException as exc:  # handed to the folding thread, which raises it
            self.failure.append(exc)
