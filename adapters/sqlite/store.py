"""The embedded EventStore: one SQLite file in WAL mode, group-committed appends.

Writes: one writer thread owns the writer connection (adapters.groupcommit). Appends
queue up on the event loop; whenever the thread is free it takes every queued append
as one group and writes it in one transaction (one statement per table, one fsync),
while the next group gathers. Reads go through aiosqlite on a second connection and
never wait for the writer (WAL).
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio
import anyio.lowlevel

from adapters.groupcommit import GroupCommitter, PendingAppend
from adapters.ledger import Batch, Ledger, refuse_if_unmet
from adapters.memory import Notifier, page_of
from adapters.notify.records import AlertRecord, DeadLetter
from adapters.sqlite import schema
from adapters.sqlite.lock import WriterLock
from adapters.sqlite.rebuild import RebuildReport, rebuild_read_model
from adapters.sqlite.writer import GroupStatements, connect_writer, prepare_writer, write_batch
from adapters.sqlrows import ACTIVE_SQL, alert_of, dead_letter_of, job_decoder, where_clause
from kernel.chain import GENESIS, ChainRow
from kernel.events import Event, decode_event
from kernel.ports import Append, JobPage, JobQuery, StoreError, StoreFull, StoreUnavailable
from kernel.state import Job, StoredEvent

T = TypeVar("T")
BATCH_APPENDS_MAX = 1024
RECENT_EVENTS = 10_000


class SqliteEventStore:
    """The EventStore on one SQLite file; see the module docstring for the write path."""

    def __init__(self, path: Path, writer: sqlite3.Connection | None,
                 reader: aiosqlite.Connection, lock: WriterLock | None) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = lock
        self._ledger = Ledger()
        self._statements = GroupStatements(writer) if writer is not None else None
        # The writer thread (a read-only store has none); it alone touches `_writer`.
        self._committer = GroupCommitter(self._write_all, self._written) if writer else None
        # The newest events, kept as decoded: tails (observer, SSE, webhooks) read them from
        # here instead of decoding them again from the file.
        self._recent: deque[StoredEvent] = deque(maxlen=RECENT_EVENTS)
        self._notifier = Notifier()
        self._closed = False
        # Called with (seconds, events) after each group commit (metrics); must not raise.
        self.commit_observer: Callable[[float, int], None] | None = None

    @classmethod
    async def open(cls, path: str | Path, *, readonly: bool = False) -> SqliteEventStore:
        """Open (creating and migrating) the log at `path`; the writer takes the file's lock."""
        path = Path(path)
        lock: WriterLock | None = None
        writer: sqlite3.Connection | None = None
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = WriterLock(path)
            lock.acquire()
            try:
                writer = await anyio.to_thread.run_sync(connect_writer, path)
                await anyio.to_thread.run_sync(schema.migrate, writer)
                await anyio.to_thread.run_sync(prepare_writer, writer)
            except BaseException:
                lock.release()
                raise
        elif not path.exists():
            raise StoreUnavailable(f"no event log at {path}")
        reader = await aiosqlite.connect(path)
        await reader.execute("PRAGMA busy_timeout=5000")
        await reader.execute("PRAGMA query_only=ON")
        store = cls(path, writer, reader, lock)
        if store._committer is not None:
            await store._committer.call(store._load_ledger)
        return store

    # -- writes ----------------------------------------------------------------------

    async def append(
        self, job_id: str, events: Sequence[Event], expected_version: int
    ) -> list[StoredEvent]:
        """Append atomically; shares a transaction with the appends queued beside it."""
        if self._closed or self._committer is None:
            raise StoreUnavailable(f"the store {self.path} is closed or read-only")
        return await self._committer.append(job_id, events, expected_version)

    async def append_batch(self, appends: Sequence[Append]) -> list[list[StoredEvent] | StoreError]:
        """Several appends in the same transaction; each succeeds or fails on its own."""
        if self._closed or self._committer is None:
            raise StoreUnavailable(f"the store {self.path} is closed or read-only")
        return await self._committer.submit(appends)

    def _written(self, requests: list[PendingAppend]) -> None:
        # On the event loop, where every reader of `_recent` runs: in seq order.
        for request in requests:
            if request.error is None:
                self._recent.extend(request.result)
        self._notifier.notify()

    def _write_all(self, requests: list[PendingAppend]) -> None:
        for start in range(0, len(requests), BATCH_APPENDS_MAX):
            self._write(requests[start : start + BATCH_APPENDS_MAX])

    def _write(self, requests: list[PendingAppend], *, trust_new: bool = True) -> None:
        assert self._writer is not None
        # A new job's id (expected version 0) is a fresh ULID: it is not looked up first.
        # Should one exist already (ids an embedding caller chose), the insert's UNIQUE
        # (job_id, version) refuses the group, and it is written again with every id
        # looked up, so only that append is refused.
        known = self._prefetch(requests, trust_new=trust_new)
        batch = self._ledger.begin(known.get, self._load_key)
        accepted: list[PendingAppend] = []
        for request in requests:
            if refuse_if_unmet(request):
                continue
            rows = batch.try_prepare(request.job_id, request.events, request.expected_version)
            if isinstance(rows, StoreError):
                request.error = rows
                continue
            request.result = [row.stored for row in rows]
            accepted.append(request)
        if not accepted:
            return
        started = time.perf_counter()
        try:
            self._commit(batch)
        except sqlite3.Error as exc:
            if trust_new and isinstance(exc, sqlite3.IntegrityError) and \
                    any(r.expected_version == 0 for r in accepted):
                for request in requests:
                    request.result, request.error = [], None
                self._write(requests, trust_new=False)
                return
            error = _translate(exc, self.path)
            if isinstance(exc, sqlite3.IntegrityError):
                self._load_ledger()  # the file disagrees with our view: trust the file
            for request in accepted:
                request.result, request.error = [], error
            return
        self._ledger.commit(batch)
        if self.commit_observer is not None:
            with contextlib.suppress(Exception):  # metrics must never fail a durable append
                self.commit_observer(time.perf_counter() - started, len(batch.rows))

    def _commit(self, batch: Batch) -> None:
        assert self._writer is not None and self._statements is not None
        write_batch(self._writer, self._statements, batch)

    def _load_ledger(self) -> None:
        assert self._writer is not None
        row = self._writer.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        self._ledger = Ledger(row[0], row[1]) if row else Ledger(0, GENESIS)
        active = self._writer.execute(
            f"SELECT body FROM jobs WHERE status IN {ACTIVE_SQL}").fetchall()
        self._ledger.load_active([job_decoder.decode(body) for (body,) in active])

    def _prefetch(self, requests: list[PendingAppend], *, trust_new: bool) -> dict[str, Job]:
        # One query for every job of the batch the ledger does not hold (not active).
        assert self._writer is not None
        active = self._ledger.active
        wanted = list({r.job_id for r in requests if r.job_id not in active
                       and not (trust_new and r.expected_version == 0)})
        known: dict[str, Job] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._writer.execute(f"SELECT body FROM jobs WHERE id IN ({marks})", chunk)
            for (body,) in rows:
                job = job_decoder.decode(body)
                known[job.id] = job
        return known

    def _load_key(self, workflow_name: str, key: str) -> str | None:
        assert self._writer is not None
        row = self._writer.execute(
            "SELECT id FROM jobs WHERE workflow_name = ? AND idempotency_key = ?",
            (workflow_name, key)).fetchone()
        return row[0] if row else None

    # -- notifier state (beside the log, written through the same single writer) --------

    async def get_checkpoint(self, name: str) -> int | None:
        """The seq a consumer has handled up to (None if it never ran)."""
        rows = await self._fetch("SELECT seq FROM checkpoints WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else None

    async def set_checkpoint(self, name: str, seq: int) -> None:
        """Record that the consumer `name` has handled every event up to `seq`."""
        await self._side_write(
            "INSERT INTO checkpoints (name, seq, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
            (name, seq, datetime.now(UTC).isoformat()))

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """Keep a delivery that exhausted its attempts (once per target and seq)."""
        await self._side_write(
            "INSERT OR IGNORE INTO dead_letters (target, seq, job_id, event_type, attempts, "
            "last_error, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (letter.target, letter.seq, letter.job_id, letter.event_type, letter.attempts,
             letter.last_error, letter.created_at.isoformat()))

    async def list_dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]:
        """The dead letters with ids past `after_id`, oldest first."""
        rows = await self._fetch(
            "SELECT id, target, seq, job_id, event_type, attempts, last_error, created_at "
            "FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [dead_letter_of(row) for row in rows]

    async def remove_dead_letter(self, letter_id: int) -> None:
        """Forget a dead letter (it was redelivered)."""
        await self._side_write("DELETE FROM dead_letters WHERE id = ?", (letter_id,))

    async def record_alert(self, record: AlertRecord) -> None:
        """Keep an alert that fired or cleared."""
        await self._side_write(
            "INSERT INTO alerts (rule, state, at, detail) VALUES (?, ?, ?, ?)",
            (record.rule, record.state, record.at.isoformat(), record.detail))

    async def list_alerts(self, limit: int = 100) -> list[AlertRecord]:
        """The alerts, newest first."""
        rows = await self._fetch(
            "SELECT id, rule, state, at, detail FROM alerts ORDER BY id DESC LIMIT ?", (limit,))
        return [alert_of(row) for row in rows]

    async def _side_write(self, sql: str, params: tuple[object, ...]) -> None:
        if self._closed or self._writer is None or self._committer is None:
            raise StoreUnavailable(f"the store {self.path} is closed or read-only")
        writer = self._writer

        def write() -> None:
            try:
                writer.execute(sql, params)
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

        await self._committer.call(write)

    # -- rebuild -----------------------------------------------------------------------

    async def rebuild(self) -> RebuildReport:
        """Drop the read model and replay the whole log into it, in one transaction."""
        if self._committer is None:
            raise StoreUnavailable("rebuild needs the store opened for writing")
        if self._committer.busy:
            raise StoreUnavailable("rebuild while appends are in flight")
        return await self._committer.call(self._rebuild)

    def _rebuild(self) -> RebuildReport:
        assert self._writer is not None
        report = rebuild_read_model(self._writer, self.path)
        self._load_ledger()
        return report

    # -- reads -----------------------------------------------------------------------

    async def read_job(self, job_id: str) -> list[StoredEvent]:
        """Every event of one job, in version order."""
        return await self._events(
            "SELECT seq, job_id, version, payload, hash FROM events "
            "WHERE job_id = ? ORDER BY version", (job_id,))

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events with seq > `after`, in seq order."""
        recent = self._recent
        if recent and recent[0].seq <= after + 1 and not self._closed:
            start = after + 1 - recent[0].seq  # seqs are gapless, so positions are exact
            return newest(recent, start, limit)
        return await self._events(
            "SELECT seq, job_id, version, payload, hash FROM events "
            "WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))

    async def read_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        """Raw rows for the hash chain: the payload bytes exactly as stored."""
        rows = await self._fetch(
            "SELECT seq, job_id, version, type, payload, hash FROM events "
            "WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
        return [ChainRow(r[0], r[1], r[2], r[3], r[4].encode(), r[5]) for r in rows]

    async def tail(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event after `after`, then each new one as it is committed."""
        async for stored in self._notifier.follow(self.read_all, after, 1.0):
            yield stored

    async def last_seq(self) -> int:
        """The newest committed seq (0 when empty)."""
        if self._writer is not None:
            return self._ledger.last_seq
        rows = list(await self._fetch("SELECT max(seq) FROM events"))
        return int(rows[0][0] or 0)

    async def get_job(self, job_id: str) -> Job | None:
        """The read-model row of one job."""
        return await self._one_job("SELECT body FROM jobs WHERE id = ?", (job_id,))

    async def find_active(self, workflow_name: str, file_path: str) -> Job | None:
        """The active job that owns a file."""
        return await self._one_job(
            f"SELECT body FROM jobs WHERE workflow_name = ? AND file_path = ? "
            f"AND status IN {ACTIVE_SQL}", (workflow_name, file_path))

    async def find_by_key(self, workflow_name: str, idempotency_key: str) -> Job | None:
        """The job created with this idempotency key."""
        return await self._one_job(
            "SELECT body FROM jobs WHERE workflow_name = ? AND idempotency_key = ?",
            (workflow_name, idempotency_key))

    async def latest_jobs(self, workflow_name: str, file_paths: Sequence[str]) -> dict[str, Job]:
        """For each of these files that ever had a job, its most recent job."""
        latest: dict[str, Job] = {}
        for start in range(0, len(file_paths), 500):
            chunk = list(file_paths[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = await self._fetch(
                f"SELECT body FROM jobs WHERE workflow_name = ? AND file_path IN ({marks}) "
                "ORDER BY created_seq", (workflow_name, *chunk))
            for (body,) in rows:
                job = job_decoder.decode(body)
                latest[job.file_path] = job
        return latest

    async def active_jobs(self, workflow_name: str | None = None) -> list[Job]:
        """Pending and running jobs, oldest first."""
        sql = f"SELECT body FROM jobs WHERE status IN {ACTIVE_SQL}"
        params: tuple[object, ...] = ()
        if workflow_name is not None:
            sql, params = sql + " AND workflow_name = ?", (workflow_name,)
        rows = await self._fetch(sql + " ORDER BY created_seq", params)
        return [job_decoder.decode(body) for (body,) in rows]

    async def list_jobs(self, query: JobQuery) -> JobPage:
        """A page of jobs, newest first, after the cursor."""
        where, params = where_clause(query, "?")
        rows = await self._fetch(
            f"SELECT body FROM jobs {where} ORDER BY created_seq DESC LIMIT ?",
            (*params, query.limit + 1))
        return page_of([job_decoder.decode(body) for (body,) in rows], query.limit)

    async def count_jobs(self) -> dict[tuple[str, str], int]:
        """Jobs per (workflow, status)."""
        rows = await self._fetch(
            "SELECT workflow_name, status, count(*) FROM jobs GROUP BY workflow_name, status")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def close(self) -> None:
        """Finish queued appends, then release the file and its lock."""
        if self._closed:
            return
        self._closed = True  # refuse new appends; the writer drains what is queued
        if self._committer is not None and self._writer is not None:
            await self._committer.stop(self._writer.close)
        await self._reader.close()
        if self._lock is not None:
            self._lock.release()

    async def _fetch(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """Run a read; a closed or failing reader raises StoreUnavailable, not a driver error."""
        if self._closed:
            raise StoreUnavailable(f"the store {self.path} is closed")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreUnavailable(f"reading {self.path} failed: {exc}") from exc

    async def _events(self, sql: str, params: tuple[object, ...]) -> list[StoredEvent]:
        rows = await self._fetch(sql, params)
        return [
            StoredEvent(seq=r[0], job_id=r[1], version=r[2], event=decode_event(r[3]), hash=r[4])
            for r in rows
        ]

    async def _one_job(self, sql: str, params: tuple[object, ...]) -> Job | None:
        rows = list(await self._fetch(sql, params))
        return job_decoder.decode(rows[0][0]) if rows else None


def newest(recent: deque[T], start: int, limit: int) -> list[T]:
    """`recent[start:start + limit]`, walked from the nearer end of the deque.

    Tails ask for the newest few events (and, once caught up, for none): walking a deque
    of 10,000 from its left end to find them cost more than the rest of a commit.
    """
    wanted = len(recent) - start
    if wanted <= 0:
        return []
    if wanted > start:
        return list(itertools.islice(recent, start, start + limit))
    events = list(itertools.islice(reversed(recent), wanted))
    events.reverse()
    return events[:limit]


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
        return StoreFull(f"the disk under {path} is full; the append was rolled back: {exc}")
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreError(f"the log refused the append: {exc}")
    return StoreUnavailable(f"the store {path} failed: {exc}")

