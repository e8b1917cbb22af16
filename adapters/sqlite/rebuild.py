"""`multiflow rebuild`: drop the job read model and fold the whole log back into it.

The fold runs in this thread while a second thread writes the finished rows
(sqlite3 lets go of the GIL while it steps), and the secondary indexes are built
once at the end instead of row by row. Only unfinished jobs stay in memory.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from pathlib import Path

import msgspec

from adapters.sqlrows import UPSERT_JOB, job_decoder, job_row
from kernel.events import JobCreated, decode_event
from kernel.ports import StoreError
from kernel.state import Job, fold_stored

CHUNK_EVENTS = 50_000
_INSERT = UPSERT_JOB.replace("%s", "?")
_DONE = None


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
    conn.execute("BEGIN IMMEDIATE")
    try:
        indexes = _drop_secondary_indexes(conn)
        conn.execute("DELETE FROM jobs")
        events, jobs = _fold_into(conn, reader)
        for statement in indexes:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        reader.close()
    return RebuildReport(events=events, jobs=jobs, seconds=time.perf_counter() - started)


def _drop_secondary_indexes(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' "
        "AND sql IS NOT NULL").fetchall()
    for name, _ in rows:
        conn.execute(f'DROP INDEX "{name}"')
    return [sql for _, sql in rows]


def _fold_into(conn: sqlite3.Connection, reader: sqlite3.Connection) -> tuple[int, int]:
    rows: queue.Queue[list[tuple[object, ...]] | None] = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    writer = threading.Thread(target=_write_rows, args=(conn, rows, failure), daemon=True)
    writer.start()
    folder = _Refold(conn, rows, failure)
    try:
        cursor = reader.execute("SELECT seq, job_id, version, payload FROM events ORDER BY seq")
        count = 0
        while chunk := cursor.fetchmany(CHUNK_EVENTS):
            folder.fold(chunk)
            count += len(chunk)
        jobs = folder.finish()
    finally:
        rows.put(_DONE)
        writer.join()
    if failure:
        raise failure[0]
    return count, jobs


def _write_rows(conn: sqlite3.Connection, rows: queue.Queue[list[tuple[object, ...]] | None],
                failure: list[BaseException]) -> None:
    while True:
        chunk = rows.get()
        try:
            if chunk is _DONE:
                return
            if not failure:  # after a failure, drain: the folder must never block
                conn.executemany(_INSERT, chunk)
        except BaseException as exc:  # handed to the folding thread, which raises it
            failure.append(exc)
        finally:
            rows.task_done()


class _Refold:
    """Folds events into jobs; finished ones go to the writer thread in chunks."""

    def __init__(self, conn: sqlite3.Connection,
                 rows: queue.Queue[list[tuple[object, ...]] | None],
                 failure: list[BaseException]) -> None:
        self.conn = conn
        self.rows = rows
        self.failure = failure
        self.active: dict[str, Job] = {}
        self.done: dict[str, Job] = {}
        self.jobs = 0

    def fold(self, rows: list[tuple[int, str, int, str]]) -> None:
        """Apply a chunk of events in seq order."""
        active, done = self.active, self.done
        for seq, job_id, version, payload in rows:
            job = active.pop(job_id, None) or done.pop(job_id, None)
            event = decode_event(payload)
            if job is None:
                if isinstance(event, JobCreated):
                    self.jobs += 1
                else:
                    job = self._load(job_id)
            job = fold_stored(job, event, seq, version)
            (active if job.is_active else done)[job_id] = job
        if len(done) >= CHUNK_EVENTS // 2:
            self._send()

    def _load(self, job_id: str) -> Job:
        # A finished job that was written already and has more events (an operator retry):
        # wait until the writer has written everything, then read it back.
        self._send()
        self.rows.join()
        row = self.conn.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"the log has events of job {job_id} before its JobCreated")
        return job_decoder.decode(row[0])

    def _send(self) -> None:
        if self.failure:
            raise self.failure[0]
        if self.done:
            self.rows.put([job_row(job) for job in self.done.values()])
            self.done.clear()

    def finish(self) -> int:
        """Send every job still held; the number of jobs folded."""
        self.done.update(self.active)
        self.active.clear()
        self._send()
        return self.jobs
