"""`multiflow rebuild`: make the job read model the fold of the whole log, in one transaction.

The fast path (docs/decisions/0007-parallel-rebuild.md): the log's job ids are split into
WORKERS ranges, and a worker process per range (adapters/sqlite/rebuild_worker.py) reads
its jobs' events in job order through the (job_id, version) index, folds each job whole
and streams its rows back. This thread, which owns the writer connection, writes them as
they come. A worker compares its rows with the table's (both in id order) and sends only
the rows that differ or are missing and the ids of rows of no job, so a read model that is
right costs no page writes, no WAL and no checkpoint. Then the table must hold exactly one
row per job of the log; when it does not, or when a stale row stands in the way of a
unique index while the rows change, the transaction rolls back and the same runs again on
an emptied table. Small logs are folded in this thread instead, the same way.

The reference path, in seq order (adapters/sqlite/fastfold.py's FastFold, with a second
thread writing): taken when the log is one the job-order fold may not take (an event out
of version or seq order, a payload the kernel refuses, an event whose job_id is not its
row's: fastfold.Irregular) or when a worker fails. It raises the StoreError naming the
first bad seq. Both are checked against the kernel's fold by tests/property/
test_rebuild_fold.py.

On the reference path, a statement per many rows instead of `executemany` matters:
sqlite3 takes the GIL back after every statement it steps, and a writer thread that
needs the GIL once per row waits for the folding thread (up to the 5 ms switch interval)
at every row. Its indexes stay: rows arrive roughly in creation order, so most index
inserts append, and their cost runs beside the fold instead of after it. Only unfinished
jobs stay in memory.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import msgspec

from adapters.sqlite.fastfold import FastFold, Irregular
from adapters.sqlite.foldrows import Row, RowMaker
from adapters.sqlite.rebuild_worker import DONE, GONE, ROWS, fold_range, worker_command
from adapters.sqlrows import JOB_COLUMNS, UPSERT_JOB, job_decoder
from kernel.state import Job

WORKERS = max(2, min(4, os.cpu_count() or 1))
WORKER_EVENTS_MIN = 50_000  # below this, the job-order fold runs in this thread
CHUNK_EVENTS = 5_000
HELD_JOBS_MIN = 5_000  # finished jobs go to the writer once this many jobs are held
ROWS_PER_STATEMENT_MAX = 1024
_COLUMNS = [column.strip() for column in JOB_COLUMNS.split(",")]
_WIDTH = len(_COLUMNS)
_VALUES = "(" + ", ".join(["?"] * _WIDTH) + ")"
_UPSERT = UPSERT_JOB[UPSERT_JOB.index(" ON CONFLICT"):]
# The workers' rows carry the body as bytes; stored as TEXT, as the live store stores it.
_BYTES_VALUES = "(" + ", ".join(["?"] * (_WIDTH - 1)) + ", CAST(? AS TEXT))"
# Rows the workers found different from the table's: every column replaced.
_UPDATE_ALL = (f" ON CONFLICT ({_COLUMNS[0]}) DO UPDATE SET "
               + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS[1:]))
_decode_frame = msgspec.msgpack.Decoder().decode
_encode_request = msgspec.msgpack.Encoder().encode


class _SeqOrder(Exception):
    """The fold in job order cannot decide this log: fold it in seq order."""


class _Stale(Exception):
    """The table holds rows the fold does not make: empty it and write every row."""


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
    """Make the `jobs` table the fold of `events`, in one transaction on `conn`."""
    started = time.perf_counter()
    with _gc_paused(), _secure_delete_off(conn):
        try:
            try:
                events, jobs = _rebuild_by_job(conn, path, keep_rows=True)
            except _Stale:
                events, jobs = _rebuild_by_job(conn, path, keep_rows=False)
        except _SeqOrder:
            events, jobs = _rebuild_in_seq_order(conn, path)
    return RebuildReport(events=events, jobs=jobs, seconds=time.perf_counter() - started)


def _rebuild_by_job(conn: sqlite3.Connection, path: Path, keep_rows: bool) -> tuple[int, int]:
    reader = sqlite3.connect(path)  # its own connection: reads while `conn` writes (WAL)
    try:
        ranges = _ranges(reader)
        write = _RowStatements(conn, keep_rows).write
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not keep_rows:
                conn.execute("DELETE FROM jobs")
            if ranges is None:
                try:
                    events, jobs = fold_range(reader, None, None, write, compare=keep_rows)
                except (Irregular, ValueError, TypeError) as exc:  # msgspec's are ValueErrors
                    raise _SeqOrder(str(exc)) from exc
            else:
                events, jobs = _run_workers(path, ranges, write, compare=keep_rows)
            (rows,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
            if rows != jobs:  # more rows than jobs: rows of jobs the log does not have
                raise _Stale() if keep_rows else _SeqOrder(f"{rows} rows for {jobs} jobs")
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            if keep_rows:  # a stale row may hold a file or a key that a new row takes
                raise _Stale() from None
            raise
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        reader.close()
    return events, jobs


def _ranges(reader: sqlite3.Connection) -> list[tuple[str | None, str | None]] | None:
    """WORKERS ranges of job ids with about as many events each; None: fold in this thread."""
    (last,) = reader.execute("SELECT max(seq) FROM events").fetchone()
    if last is None or last < WORKER_EVENTS_MIN or getattr(sys, "frozen", False):
        return None
    splits = [row[0] for number in range(1, WORKERS) for row in reader.execute(
        "SELECT job_id FROM events ORDER BY job_id LIMIT 1 OFFSET ?", (last * number // WORKERS,))]
    bounds = [None, *splits, None]
    return list(itertools.pairwise(bounds))


def _run_workers(path: Path, ranges: list[tuple[str | None, str | None]],
                 write: Callable[[int, list[Any]], None], compare: bool) -> tuple[int, int]:
    """Start a worker per range and write their rows as they come: (events, jobs)."""
    frames: queue.Queue[list[Any] | None] = queue.Queue(maxsize=4 * len(ranges))
    procs: list[subprocess.Popen[bytes]] = []
    open_streams = [0]
    try:
        for first, end in ranges:
            try:
                proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
            except OSError as exc:
                raise _SeqOrder(f"no worker process: {exc}") from exc
            procs.append(proc)
            assert proc.stdin is not None and proc.stdout is not None
            open_streams[0] += 1
            threading.Thread(target=_read_frames, args=(proc.stdout, frames), daemon=True,
                             name="rebuild-reader").start()
            try:
                proc.stdin.write(_encode_request([str(path), first, end, compare]))
                proc.stdin.close()
            except OSError as exc:  # it ended before reading its request
                raise _SeqOrder(f"a worker process ended at its start: {exc}") from exc
        events = jobs = done = 0
        while open_streams[0]:
            message = frames.get()
            if message is None:
                open_streams[0] -= 1
            elif message[0] in (ROWS, GONE):
                write(message[0], message[1])
            elif message[0] == DONE:
                events, jobs, done = events + message[1], jobs + message[2], done + 1
            else:
                raise _SeqOrder(message[1])
        if done != len(ranges):
            raise _SeqOrder("a worker process ended without its result")
        return events, jobs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        while open_streams[0]:  # let every reader thread end (they may wait on a full queue)
            if frames.get() is None:
                open_streams[0] -= 1
        for proc in procs:
            proc.wait()


def _read_frames(stream: IO[bytes], frames: queue.Queue[list[Any] | None]) -> None:
    try:
        while len(header := stream.read(4)) == 4:
            frames.put(_decode_frame(stream.read(int.from_bytes(header, "little"))))
    except (msgspec.DecodeError, OSError, ValueError):  # a worker killed mid-frame
        pass
    finally:
        stream.close()
        frames.put(None)


class _RowStatements:
    """Writes what the fold sends: rows (flat) to insert or replace, ids to delete."""

    def __init__(self, conn: sqlite3.Connection, keep_rows: bool) -> None:
        self.conn = conn
        self.sql = functools.partial(_bytes_insert_sql, tail=_UPDATE_ALL if keep_rows else "")

    def write(self, kind: int, items: list[Any]) -> None:
        """ROWS: rows given as one flat list, _WIDTH values each; GONE: ids."""
        if kind == GONE:
            self.conn.executemany("DELETE FROM jobs WHERE id = ?", [(id_,) for id_ in items])
            return
        _insert_flat(self.conn, items, self.sql)


def _insert_flat(conn: sqlite3.Connection, values: list[Any], sql: Callable[[int], str]
                 ) -> None:
    """Insert rows given as one flat list (_WIDTH values a row), `sql(count)` the statement
    for `count` rows, as few statements as the variable limit allows."""
    per_statement = max(1, min(ROWS_PER_STATEMENT_MAX,
                               conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _WIDTH))
    rows, start = len(values) // _WIDTH, 0
    while start < rows:
        # Statements of a few sizes only (powers of two), so sqlite3 keeps them prepared.
        count = min(per_statement, 1 << ((rows - start).bit_length() - 1))
        conn.execute(sql(count), values if count == rows
                     else values[start * _WIDTH:(start + count) * _WIDTH])
        start += count


@functools.cache
def _bytes_insert_sql(rows: int, tail: str) -> str:
    return f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES {', '.join([_BYTES_VALUES] * rows)}{tail}"


def _rebuild_in_seq_order(conn: sqlite3.Connection, path: Path) -> tuple[int, int]:
    reader = sqlite3.connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            counted = _fold_into(conn, reader)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        reader.close()
    return counted


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
    _insert_flat(conn, list(itertools.chain.from_iterable(rows)), _insert_sql)


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
