"""The fold of one range of job ids, for `multiflow rebuild`: in a worker process, or inline.

adapters/sqlite/rebuild.py splits the log's job ids into ranges and starts one process per
range (`worker_command`). A worker reads its range's events in job order through the
(job_id, version) index and folds each job whole (fastfold.JobOrder: a job is finished
when the next one begins, so only one job is ever held). Its rows come out in id order,
the order of the `jobs` table's primary key, so the worker also reads the table's rows of
its range beside them (its own read transaction, which began after the rebuild's write
transaction did) and sends only what must change: the rows that differ or are missing,
and the ids of rows the log has no job for. A read model that is right costs the writer
nothing. With `compare` off (the table is being emptied) every row is sent.

The frames on stdout: a 4-byte little-endian length, then a msgpack array:

    [ROWS, [13 values per row, JOB_COLUMNS order, the body as UTF-8 bytes]]
    [GONE, [ids of rows to delete]]
    [DONE, events, jobs]
    [IRREGULAR, why]        the log needs the fold in seq order (fastfold.Irregular, or
                            a payload the kernel's decoder refuses)

The request comes on stdin, as one msgpack array [database path, first id or None, end id
or None, compare], so any job id passes whole (a NUL cannot be a command-line argument).

A worker imports only this module, fastfold, foldrows and the kernel: BOOT puts the
`adapters` packages in sys.modules without running their `__init__` (which loads the whole
application, 0.4 s and 20 MB per process).
"""

from __future__ import annotations

import gc
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from adapters.sqlite.fastfold import JobOrder, State
from adapters.sqlite.foldrows import Row, RowMaker

ROWS, GONE, DONE, IRREGULAR = 0, 1, 2, 3
CHUNK_EVENTS = 5_000
FRAME_ROWS = 256  # rows per frame: one INSERT statement of the main process each
JOB_COLUMNS = ("id, workflow_name, file_path, status, channel_name, priority, "
               "idempotency_key, created_us, updated_us, created_seq, seq, version, body")
WIDTH = 13
ROOT = Path(__file__).resolve().parents[2]  # holds adapters/ and kernel/
BOOT = (
    "import os, sys, types\n"
    "root = sys.argv[1]\n"
    "sys.path.insert(0, root)\n"
    "for name in ('adapters', 'adapters.sqlite'):\n"
    "    package = types.ModuleType(name)\n"
    "    package.__path__ = [os.path.join(root, *name.split('.'))]\n"
    "    sys.modules[name] = package\n"
    "from adapters.sqlite.rebuild_worker import main\n"
    "main()\n"
)


def worker_command() -> list[str]:
    """The command line that starts a worker process."""
    return [sys.executable, "-c", BOOT, str(ROOT)]


def _bounds(first: str | None, end: str | None, column: str) -> tuple[str, list[str]]:
    where, params = [], []
    if first is not None:
        where.append(f"{column} >= ?")
        params.append(first)
    if end is not None:
        where.append(f"{column} < ?")
        params.append(end)
    return " AND ".join(where), params


def range_query(first: str | None, end: str | None) -> tuple[str, list[str]]:
    """The events of the jobs with first <= job_id < end (None: unbounded), in job order."""
    where, params = _bounds(first, end, "job_id")
    return ("SELECT version, seq, CAST(payload AS BLOB) FROM events"
            + (f" WHERE {where}" if where else "") + " ORDER BY job_id, version"), params


def table_query(first: str | None, end: str | None) -> tuple[str, list[str]]:
    """The table's rows of the range, in id order, as `RowMaker.rows_with_bytes` makes them.

    A body that is not TEXT reads as NULL, so it differs from any made one. Rows whose id is
    not TEXT are left out: they are no job's, and the rebuild's count of rows finds them."""
    where, params = _bounds(first, end, "id")
    columns = JOB_COLUMNS.replace("body", "CASE typeof(body) WHEN 'text' THEN "
                                          "CAST(body AS BLOB) END")
    return (f"SELECT {columns} FROM jobs WHERE typeof(id) = 'text'"
            + (f" AND {where}" if where else "") + " ORDER BY id"), params


def fold_range(conn: sqlite3.Connection, first: str | None, end: str | None,
               send: Callable[[int, list[Any]], None], compare: bool) -> tuple[int, int]:
    """Fold the range; `send(ROWS, rows)` gets what to write, `send(GONE, ids)` what to
    delete. (events, jobs)."""
    maker = _Frames(send, _table_rows(conn, first, end) if compare else None)
    fold = JobOrder(first, end)
    finished: list[State] = []
    cursor = conn.execute(*range_query(first, end))
    while chunk := cursor.fetchmany(CHUNK_EVENTS):
        fold.fold(chunk, finished)
        if len(finished) >= FRAME_ROWS:
            maker.add(finished)
            finished = []
    fold.finish(finished)
    maker.add(finished)
    maker.close()
    return fold.events, fold.jobs


def _table_rows(conn: sqlite3.Connection, first: str | None, end: str | None) -> Iterator[Row]:
    cursor = conn.execute(*table_query(first, end))
    while chunk := cursor.fetchmany(CHUNK_EVENTS):
        yield from chunk


class _Frames:
    """Turns finished jobs (in id order) into frames of rows to write and ids to delete."""

    def __init__(self, send: Callable[[int, list[Any]], None],
                 table: Iterator[Row] | None) -> None:
        self.send = send
        self.rows = RowMaker()
        self.table = table
        self.head = None if table is None else next(table, None)
        self.changed: list[Any] = []  # flat, JOB_COLUMNS order
        self.gone: list[str] = []

    def add(self, states: list[State]) -> None:
        """Compare the states' rows with the table's (both in id order); frame the changes."""
        rows = self.rows.rows_with_bytes(states)
        if self.table is None:
            changed = rows
        else:
            changed, table, head, gone = [], self.table, self.head, self.gone
            for row in rows:
                job_id = row[0]
                while head is not None and head[0] < job_id:  # a row of no job of the log
                    gone.append(head[0])
                    head = next(table, None)
                if head is not None and head[0] == job_id:
                    if head != row:
                        changed.append(row)
                    head = next(table, None)
                else:
                    changed.append(row)
            self.head = head
        for row in changed:
            self.changed.extend(row)
        self._flush(whole_frames_only=True)

    def close(self) -> None:
        """Send what is left, and the table's rows after the last job."""
        while self.head is not None and self.table is not None:
            self.gone.append(self.head[0])
            self.head = next(self.table, None)
        self._flush(whole_frames_only=False)

    def _flush(self, whole_frames_only: bool) -> None:
        frame = FRAME_ROWS * WIDTH
        while len(self.changed) >= (frame if whole_frames_only else 1):
            self.send(ROWS, self.changed[:frame])
            del self.changed[:frame]
        if self.gone and (len(self.gone) >= FRAME_ROWS or not whole_frames_only):
            self.send(GONE, self.gone)
            self.gone = []


def main() -> None:
    """A worker process: the request from stdin, the frames to stdout."""
    gc.disable()  # the fold makes no cycles (see rebuild._gc_paused)
    out = sys.stdout.buffer
    encode = msgspec.msgpack.Encoder().encode

    def send(message: list[Any]) -> None:
        data = encode(message)
        out.write(len(data).to_bytes(4, "little"))
        out.write(data)

    path, first, end, compare = msgspec.msgpack.decode(sys.stdin.buffer.read())
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA query_only = ON")
        events, jobs = fold_range(conn, first, end, lambda kind, items: send([kind, items]),
                                  compare)
        send([DONE, events, jobs])
    except Exception as exc:  # Irregular, a payload msgspec refuses, ...: the seq-order
        send([IRREGULAR, f"{type(exc).__name__}: {exc}"])  # fold decides and raises it
    finally:
        conn.close()
    out.flush()
