"""Audits over any store: verify the hash chain, and the state of every job at a past point."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol

import msgspec

from kernel.chain import ChainReport, ChainRow, link
from kernel.queue import JobQueue
from kernel.state import Job, Status, StoredEvent, apply

PAGE_EVENTS = 10_000


class ChainSource(Protocol):
    async def read_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]: ...


class EventSource(Protocol):
    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]: ...


async def verify_chain(store: ChainSource) -> ChainReport:
    """Walk the whole log; the report names the first seq whose hash does not hold."""
    report = ChainReport()
    after = 0
    while rows := await store.read_chain(after, PAGE_EVENTS):
        for row in rows:
            if row.seq != after + 1:
                report.first_bad_seq = after + 1 if row.seq > after + 1 else row.seq
                report.reason = f"seq {after + 1} is missing" if row.seq > after + 1 else \
                    "seq out of order"
                return report
            expected = link(report.last_hash, row.seq, row.job_id, row.version,
                            row.type_tag, row.payload)
            if expected != row.hash:
                report.first_bad_seq = row.seq
                report.reason = "hash does not match its content or its predecessor"
                return report
            report.last_hash, after = row.hash, row.seq
            report.checked += 1
    return report


async def iter_events(store: EventSource, after: int = 0) -> AsyncIterator[StoredEvent]:
    """Every stored event after `after`, page by page."""
    while page := await store.read_all(after, PAGE_EVENTS):
        for stored in page:
            yield stored
        after = page[-1].seq


class Snapshot(msgspec.Struct, kw_only=True):
    """Every job, and the queue's order, as they were at one point of the log."""

    seq: int
    jobs: dict[str, Job]
    queue: list[str]  # pending job ids in the order they would have run

    def counts(self) -> dict[str, int]:
        """How many jobs per status."""
        counts = {str(status): 0 for status in Status}
        for job in self.jobs.values():
            counts[str(job.status)] += 1
        return counts


async def snapshot_at(
    store: EventSource,
    *,
    seq: int | None = None,
    at: datetime | None = None,
    aging_interval_s: float | None = 60.0,
) -> Snapshot:
    """Replay the log up to `seq` (inclusive) or up to time `at`; None/None: the whole log."""
    jobs: dict[str, Job] = {}
    last_seq = 0
    async for stored in iter_events(store):
        if (seq is not None and stored.seq > seq) or (at is not None and stored.event.at > at):
            break
        jobs[stored.job_id] = apply(jobs.get(stored.job_id), stored)
        last_seq = stored.seq
    queue = JobQueue(aging_interval_s)
    for job in jobs.values():
        if job.status is Status.PENDING:
            queue.push(job)
    when = at or max((job.updated_at for job in jobs.values()), default=None)
    order = [job.id for job in queue.ordered(when)] if when is not None else []
    return Snapshot(seq=last_seq, jobs=jobs, queue=order)
