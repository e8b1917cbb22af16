"""The observer: a consumer of the event log that writes the logs and feeds the metrics.

The kernel never logs: its events are its log. This consumer tails them and
turns each into a structured log line (bound to job_id, workflow_name and
attempt) and metric updates, with one canonical line per finished job
(status, duration, wait, attempts, error).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import anyio
import anyio.abc
import structlog

from adapters.metrics import Metrics
from kernel.events import (
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobDuplicateReceived,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
    event_tag,
)
from kernel.ports import EventStore, StoreError
from kernel.state import Job, Status, StoredEvent, apply

log = structlog.get_logger("multiflow.jobs")
# Events logged at debug level only: nothing else of them is logged.
_DEBUG_ONLY = frozenset({JobCreated, JobStarted, JobProgress, JobDuplicateReceived})


class _Silent:
    """A logger that writes nothing: for lines another node writes."""

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    debug = info = warning = _nothing


_SILENT = _Silent()


class Observer:
    """Tails the log from where it stood at start; keeps per-status job gauges right.

    In a cluster (`node` set) every node follows every event, and a job's lines are
    written by the node that ran it (its `worker`): once per job for the cluster, and
    never two processes writing one workflow's log file. Lines of a job no node ran
    (refused at intake, cancelled while pending) are written by each node. The metrics
    count every event the node follows.
    """

    def __init__(self, store: EventStore, metrics: Metrics, node: str | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.node = node
        self.last_seq = 0
        self._active: dict[str, Job] = {}
        # Each metric's child per label values: `labels()` costs more than the update.
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._debug = False
        self._debug_checked_until = 0.0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Seed the gauges from the read model, then follow every new event."""
        self.last_seq = await self.store.last_seq()
        for (workflow, status), count in (await self.store.count_jobs()).items():
            self._child(self.metrics.jobs, workflow, status).set(count)
        for job in await self.store.active_jobs():
            self._active[job.id] = job
        task_status.started()
        while True:
            try:
                async for stored in self.store.tail(self.last_seq):
                    try:
                        await self.observe(stored)
                    except StoreError:
                        raise
                    except Exception:
                        # A log line or a metric must never stop the node: that event's
                        # line is lost, the jobs go on.
                        log.exception("observe_failed", seq=stored.seq, job_id=stored.job_id)
                    self.last_seq = stored.seq
            except StoreError:
                await anyio.sleep(1.0)  # the store is closing or down: try again

    async def observe(self, stored: StoredEvent) -> None:
        """Log one event and update the metrics it moves."""
        before = self._active.get(stored.job_id) or await self._load(stored)
        if before is not None and before.version >= stored.version:
            return  # seen already (the job was loaded after this event committed)
        job = apply(before, stored)
        if job.is_active:
            self._active[job.id] = job
        else:
            self._active.pop(job.id, None)
        self._count(before, job)
        self._log(stored, job)

    async def _load(self, stored: StoredEvent) -> Job | None:
        if isinstance(stored.event, JobCreated):
            return None
        events = await self.store.read_job(stored.job_id)
        job = None
        for earlier in events:
            if earlier.seq >= stored.seq:
                break
            job = apply(job, earlier)
        return job

    def _count(self, before: Job | None, job: Job) -> None:
        if before is not None and before.status is job.status:
            return
        if before is not None:
            self._child(self.metrics.jobs, before.workflow_name, before.status.value).dec()
        self._child(self.metrics.jobs, job.workflow_name, job.status.value).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once."""
        key = (metric._name, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _debug_enabled(self) -> bool:
        """Whether debug lines are wanted, asked of structlog at most once a second: binding
        a logger for a line nobody wants cost more than the rest of an event's handling."""
        now = time.monotonic()
        if now >= self._debug_checked_until:
            self._debug = log.is_enabled_for(logging.DEBUG)
            self._debug_checked_until = now + 1.0
        return self._debug

    def _log(self, stored: StoredEvent, job: Job) -> None:
        event, workflow = stored.event, job.workflow_name
        if event.__class__ is JobStarted and event.attempt == 1:
            self._child(self.metrics.intake, workflow, "accepted", "").inc()
            self._child(self.metrics.wait, workflow).observe(_seconds(job.created_at, event.at))
        if event.__class__ in _DEBUG_ONLY and not self._debug_enabled():
            return
        bound: Any = _SILENT
        if self.node is None or job.worker in ("", self.node):
            bound = log.bind(job_id=job.id, workflow_name=workflow, attempt=job.attempts,
                             seq=stored.seq)
        match event:
            case JobStarted():
                bound.debug("job_started", priority=job.priority)
            case JobFailed():
                self._failed(bound, event, job)
            case JobCompleted() | JobCancelled():
                self._finished(bound, job)
            case JobCreated():
                bound.debug("job_created", file_path=job.file_path, priority=job.priority,
                           channel_name=job.channel_name, completeness=job.completeness)
            case JobRetried():
                bound.info("job_retried", actor=event.actor, reason=event.reason)
            case _:
                bound.debug(event_tag(event).replace(".", "_"))

    def _failed(self, bound: Any, event: JobFailed, job: Job) -> None:
        self._child(self.metrics.failures, job.workflow_name, event.error_type).inc()
        if event.attempt == 0:
            self._child(self.metrics.intake, job.workflow_name, "refused", event.error_type).inc()
        if event.retry_at is not None:
            bound.warning("job_attempt_failed", error_type=event.error_type,
                          error=event.message, retry_at=event.retry_at.isoformat())
        else:
            self._finished(bound, job)

    def _finished(self, bound: Any, job: Job) -> None:
        status = str(job.status)
        self._child(self.metrics.finished, job.workflow_name, status).inc()
        duration_s = _seconds(job.started_at, job.finished_at)
        if job.started_at is not None:
            self._child(self.metrics.duration, job.workflow_name).observe(duration_s)
        level = bound.info if job.status is Status.COMPLETED else bound.warning
        level("job_finished", status=status, duration_s=round(duration_s, 3),
              wait_s=round(_seconds(job.created_at, job.started_at or job.finished_at), 3),
              attempts=job.attempts, error_type=job.error.type if job.error else None,
              error=job.error.message if job.error else None)


def _seconds(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None:
        return 0.0
    return max(0.0, (end - start).total_seconds())
