"""The queue projection: which pending job runs next.

Order: the highest effective priority first; FIFO by log order (the seq of
`JobCreated`) within one priority. A job waiting for its `retry_at` is not
ready. Aging: a ready job's effective priority is its priority plus one per
full `aging_interval_s` it has waited, so a flood of high-priority jobs cannot
starve a low one for ever: it climbs to PRIORITY_MAX within
(PRIORITY_MAX - priority) intervals, and then its log order wins.

Pending jobs sit in one FIFO heap per (workflow, priority): a pick looks only
at the heads of those heaps (a handful in practice), so it costs O(buckets +
log n) and needs no re-sorting as jobs age.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from datetime import datetime

import msgspec

from kernel.events import PRIORITY_MAX
from kernel.state import Job, Status

Bucket = tuple[str, int]  # (workflow_name, priority)


class _Entry(msgspec.Struct, gc=False):
    # Not tracked by the cyclic GC (nor are Job and the events): a queue of many pending
    # jobs otherwise makes every full collection long (a p99 of the submit path).
    job: Job
    token: int


class JobQueue:
    """Pending jobs, ordered by effective priority then log order."""

    def __init__(self, aging_interval_s: float | None = 60.0) -> None:
        if aging_interval_s is not None and not aging_interval_s > 0:
            raise ValueError("aging_interval_s must be positive, or None to turn aging off")
        self.aging_interval_s = aging_interval_s
        self._entries: dict[str, _Entry] = {}
        self._ready: dict[Bucket, list[tuple[int, int, str]]] = {}
        self._delayed: list[tuple[datetime, int, int, str]] = []
        self._tokens = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def push(self, job: Job) -> None:
        """Queue a pending job, or replace the queued copy of it."""
        if job.status is not Status.PENDING:
            raise ValueError(f"only pending jobs are queued, job {job.id} is {job.status}")
        token = next(self._tokens)
        self._entries[job.id] = _Entry(job, token)
        if job.retry_at is not None:
            heapq.heappush(self._delayed, (job.retry_at, job.created_seq, token, job.id))
        else:
            self._push_ready(job, token)

    def discard(self, job_id: str) -> Job | None:
        """Take a job out of the queue (claimed elsewhere, cancelled); its heap slot goes stale."""
        entry = self._entries.pop(job_id, None)
        return entry.job if entry else None

    def get(self, job_id: str) -> Job | None:
        """The queued copy of a job, if it is queued."""
        entry = self._entries.get(job_id)
        return entry.job if entry else None

    def jobs(self) -> Iterator[Job]:
        """Every queued job, in no particular order."""
        return (entry.job for entry in self._entries.values())

    def pick(self, now: datetime, can_run: Callable[[Job], bool] = lambda job: True) -> Job | None:
        """Remove and return the job that should run next among those `can_run` allows."""
        self._promote_due(now)
        best: tuple[float, int, Bucket] | None = None
        for bucket, heap in self._ready.items():
            head = self._head(heap)
            if head is None or not can_run(head):
                continue
            rank = (-self.effective_priority(head, now), head.created_seq, bucket)
            if best is None or rank < best:
                best = rank
        if best is None:
            return None
        bucket = best[2]
        _, _, job_id = heapq.heappop(self._ready[bucket])
        job = self._entries.pop(job_id).job
        if not self._ready[bucket]:
            del self._ready[bucket]
        return job

    def effective_priority(self, job: Job, now: datetime) -> int:
        """The job's priority plus one per full aging interval since it was created.

        Aging counts from creation (not from the last retry), so within one FIFO heap the
        head is always the most aged job, and capped at PRIORITY_MAX: a starved job
        reaches the top priority and then wins by log order.
        """
        if not self.aging_interval_s or job.priority >= PRIORITY_MAX:
            return job.priority
        waited_s = max(0.0, (now - job.created_at).total_seconds())
        return min(PRIORITY_MAX, job.priority + int(waited_s // self.aging_interval_s))

    def next_due(self) -> datetime | None:
        """The earliest `retry_at` among jobs that are not ready yet."""
        while self._delayed and not self._is_live(self._delayed[0][2], self._delayed[0][3]):
            heapq.heappop(self._delayed)
        return self._delayed[0][0] if self._delayed else None

    def ordered(self, now: datetime) -> list[Job]:
        """Every queued job in the order it would run now (waiting retries last, by time)."""
        shadow = JobQueue(self.aging_interval_s)
        for entry in self._entries.values():
            shadow.push(entry.job)
        shadow._promote_due(now)
        order: list[Job] = []
        while (job := shadow.pick(now)) is not None:
            order.append(job)
        return order + sorted(shadow.jobs(), key=lambda j: (j.retry_at or now, j.created_seq))

    def _push_ready(self, job: Job, token: int) -> None:
        heap = self._ready.setdefault((job.workflow_name, job.priority), [])
        heapq.heappush(heap, (job.created_seq, token, job.id))

    def _promote_due(self, now: datetime) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, token, job_id = heapq.heappop(self._delayed)
            if self._is_live(token, job_id):
                self._push_ready(self._entries[job_id].job, token)

    def _is_live(self, token: int, job_id: str) -> bool:
        entry = self._entries.get(job_id)
        return entry is not None and entry.token == token

    def _head(self, heap: list[tuple[int, int, str]]) -> Job | None:
        while heap and not self._is_live(heap[0][1], heap[0][2]):
            heapq.heappop(heap)
        if not heap:
            return None
        return self._entries[heap[0][2]].job
