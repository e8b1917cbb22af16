"""An in-memory EventStore: the fake for tests and for embedding without a disk."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated

import anyio
import msgspec

from adapters.ledger import Ledger, conditions, unmet
from adapters.notify.records import AlertRecord, DeadLetter
from kernel.chain import ChainRow
from kernel.events import Event, encode_event, event_tag
from kernel.ports import Append, JobPage, JobQuery, StoreError, StoreUnavailable
from kernel.state import Job, StoredEvent

ReadAll = Callable[[int, int], Awaitable[list[StoredEvent]]]


class Notifier:
    """Wakes every tailer when new events are committed."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        """Wake everyone waiting now."""
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Wait for the next notify, or at most `timeout_s`."""
        event = self._event
        with anyio.move_on_after(timeout_s):
            await event.wait()

    async def follow(self, read_all: ReadAll, after: int, poll_s: float
                     ) -> AsyncIterator[StoredEvent]:
        """Every event after `after`, then each new one: woken at once by this process's
        commits, polling every `poll_s` for any other writer's."""
        while True:
            batch = await read_all(after, 1000)
            for stored in batch:
                yield stored
                after = stored.seq
            if not batch:
                await self.wait(poll_s)


class MemoryEventStore:
    """The whole log and read model in dicts; same contract as the SQLite store."""

    def __init__(self) -> None:
        self._events: list[StoredEvent] = []
        self._by_job: dict[str, list[StoredEvent]] = {}
        self._jobs: dict[str, Job] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._ledger = Ledger()
        self._notifier = Notifier()
        self._closed = False
        self._checkpoints: dict[str, int] = {}
        self._dead: dict[int, DeadLetter] = {}
        self._alerts: list[AlertRecord] = []

    async def append(
        self, job_id: str, events: Sequence[Event], expected_version: int
    ) -> list[StoredEvent]:
        """Append atomically (see the EventStore port)."""
        (result,) = await self.append_batch([Append(job_id, events, expected_version)])
        if isinstance(result, StoreError):
            raise result
        return result

    async def append_batch(self, appends: Sequence[Append]) -> list[list[StoredEvent] | StoreError]:
        """Several appends at once; each succeeds or fails on its own."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        batch = self._ledger.begin(self._jobs.get, lambda wf, key: self._keys.get((wf, key)))
        results: list[list[StoredEvent] | StoreError] = []
        for item, requires in zip(appends, conditions(appends), strict=True):
            if any(isinstance(results[i], StoreError) for i in requires):
                results.append(unmet(item.job_id))
                continue
            rows = batch.try_prepare(item.job_id, item.events, item.expected_version)
            results.append(rows if isinstance(rows, StoreError) else [r.stored for r in rows])
        self._ledger.commit(batch)
        for job in batch.jobs.values():
            self._jobs[job.id] = job
        self._keys.update(batch.keys)
        for row in batch.rows:
            self._events.append(row.stored)
            self._by_job.setdefault(row.stored.job_id, []).append(row.stored)
        self._notifier.notify()
        return results

    async def read_job(self, job_id: str) -> list[StoredEvent]:
        """Every event of one job, in version order."""
        return list(self._by_job.get(job_id, ()))

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events after `after`; seq is gapless, so it indexes the list."""
        return self._events[max(0, after) : max(0, after) + limit]

    async def read_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        """The chain's rows; the memory store keeps events decoded, and encoding is stable."""
        return [
            ChainRow(e.seq, e.job_id, e.version, event_tag(e.event), encode_event(e.event), e.hash)
            for e in await self.read_all(after, limit)
        ]

    async def tail(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event after `after`, then each new one as it is committed."""
        async for stored in self._notifier.follow(self.read_all, after, 1.0):
            yield stored

    async def last_seq(self) -> int:
        """The newest seq (0 when empty)."""
        return self._ledger.last_seq

    async def get_job(self, job_id: str) -> Job | None:
        """The read-model row of one job."""
        return self._jobs.get(job_id)

    async def find_active(self, workflow_name: str, file_path: str) -> Job | None:
        """The active job that owns a file."""
        owner = self._ledger.files.get((workflow_name, file_path))
        return self._jobs.get(owner) if owner else None

    async def find_by_key(self, workflow_name: str, idempotency_key: str) -> Job | None:
        """The job created with this idempotency key."""
        owner = self._keys.get((workflow_name, idempotency_key))
        return self._jobs.get(owner) if owner else None

    async def latest_jobs(self, workflow_name: str, file_paths: Sequence[str]) -> dict[str, Job]:
        """For each of these files that ever had a job, its most recent job."""
        wanted = set(file_paths)
        latest: dict[str, Job] = {}
        for job in self._jobs.values():  # in creation order: the last one wins
            if job.workflow_name == workflow_name and job.file_path in wanted:
                latest[job.file_path] = job
        return latest

    async def active_jobs(self, workflow_name: str | None = None) -> list[Job]:
        """Pending and running jobs, oldest first."""
        jobs = [
            job
            for job in self._ledger.active.values()
            if workflow_name is None or job.workflow_name == workflow_name
        ]
        return sorted(jobs, key=lambda job: job.created_seq)

    async def list_jobs(self, query: JobQuery) -> JobPage:
        """A page of jobs, newest first, after the cursor."""
        before = decode_cursor(query.cursor)
        matches = (job for job in reversed(self._jobs.values()) if _matches(job, query, before))
        items: list[Job] = []
        for job in matches:
            items.append(job)
            if len(items) > query.limit:
                break
        return page_of(items, query.limit)

    async def count_jobs(self) -> dict[tuple[str, str], int]:
        """Jobs per (workflow, status)."""
        counts: dict[tuple[str, str], int] = {}
        for job in self._jobs.values():
            key = (job.workflow_name, str(job.status))
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def get_checkpoint(self, name: str) -> int | None:
        """The seq a consumer has handled up to (None if it never ran)."""
        return self._checkpoints.get(name)

    async def set_checkpoint(self, name: str, seq: int) -> None:
        """Record that the consumer `name` has handled every event up to `seq`."""
        self._checkpoints[name] = seq

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """Keep a delivery that exhausted its attempts (once per target and seq)."""
        if any((d.target, d.seq) == (letter.target, letter.seq) for d in self._dead.values()):
            return
        letter_id = max(self._dead, default=0) + 1
        self._dead[letter_id] = msgspec.structs.replace(letter, id=letter_id)

    async def list_dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]:
        """The dead letters with ids past `after_id`, oldest first."""
        return [self._dead[k] for k in sorted(self._dead) if k > after_id][:limit]

    async def remove_dead_letter(self, letter_id: int) -> None:
        """Forget a dead letter (it was redelivered)."""
        self._dead.pop(letter_id, None)

    async def record_alert(self, record: AlertRecord) -> None:
        """Keep an alert that fired or cleared."""
        self._alerts.append(msgspec.structs.replace(record, id=len(self._alerts) + 1))

    async def list_alerts(self, limit: int = 100) -> list[AlertRecord]:
        """The alerts, newest first."""
        return list(reversed(self._alerts))[:limit]

    async def close(self) -> None:
        """Refuse further appends."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")


def _matches(job: Job, query: JobQuery, before: int | None) -> bool:
    return (
        (before is None or job.created_seq < before)
        and (query.workflow_name is None or job.workflow_name == query.workflow_name)
        and (query.status is None or job.status == query.status)
        and (query.channel_name is None or job.channel_name == query.channel_name)
        and (query.created_after is None or job.created_at >= query.created_after)
        and (query.created_before is None or job.created_at < query.created_before)
    )


class _Cursor(msgspec.Struct, array_like=True):
    before_seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


def encode_cursor(before_seq: int) -> str:
    """An opaque cursor: the page continues with jobs created before this seq."""
    return base64.urlsafe_b64encode(msgspec.json.encode(_Cursor(before_seq))).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The seq a cursor stands for; ValueError for a cursor we did not make."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return msgspec.json.decode(raw, type=_Cursor).before_seq
    except (ValueError, msgspec.DecodeError) as exc:
        raise ValueError("invalid cursor") from exc


def page_of(items: list[Job], limit: int) -> JobPage:
    """Cut a newest-first list (fetched with one extra row) into a page and its cursor."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if len(items) > limit:
        items = items[:limit]
        return JobPage(items=items, next_cursor=encode_cursor(items[-1].created_seq))
    return JobPage(items=items, next_cursor=None)
