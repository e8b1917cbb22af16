"""The job status view and its fold: `evolve(job, event) -> job` is total."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from kernel import layout
from kernel.events import (
    AnyEvent,
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobDuplicateReceived,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
)


class Status(enum.StrEnum):
    """Where a job stands in its lifecycle."""

    PENDING = "pending"  # also while waiting for retry_at
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # finally failed
    CANCELLED = "cancelled"


ACTIVE = frozenset({Status.PENDING, Status.RUNNING})
TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Why the last attempt failed, or who cancelled the job."""

    type: str
    message: str
    traceback: str = ""
    actor: str | None = None


class Job(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One job as the log says it is now: the status view."""

    id: str
    workflow_name: str
    file_path: str
    current_path: str
    channel_name: str | None = None
    priority: int = 0
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    completeness: str = "submitted"
    idempotency_key: str | None = None
    status: Status = Status.PENDING
    attempts: int = 0
    progress: float = 0.0
    progress_message: str = ""
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retry_at: datetime | None = None
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None
    # A tuple: a list per Job (the store, the manager and the observer each hold one)
    # made three objects per job for the cyclic garbage collector to walk.
    output_paths: tuple[str, ...] = ()
    duplicates: int = 0  # identical files dropped again and not processed
    worker: str = ""  # the node that made the latest claim (JobStarted.worker)
    version: int = 0  # events applied: the expected_version of the next append
    seq: int = 0  # global position of the last event applied
    created_seq: int = 0  # global position of JobCreated: FIFO order in the queue

    @property
    def is_active(self) -> bool:
        """Pending or running: the job still owns its file."""
        return self.status in ACTIVE


def evolve(job: Job | None, event: Event) -> Job:
    """Apply one event to a job: a pure fold step (replay is a fold of `evolve`)."""
    return _fold(job, event, None)


def _fold(job: Job | None, event: Event, seq: int | None) -> Job:
    if job is None:
        if not isinstance(event, JobCreated):
            raise ValueError(f"{type(event).__name__} for unknown job {event.job_id}")
        created = _created(event)
        return created if seq is None else msgspec.structs.replace(
            created, seq=seq, created_seq=seq)
    step = _STEPS.get(type(event))
    if step is None:
        raise ValueError(f"{type(event).__name__} cannot apply to existing job {job.id}")
    return step(job, event, job.seq if seq is None else seq)


# One function per event type; each is a single `replace`, since replay speed is the
# cost of every rebuild and audit (see docs/performance.md).


def _started(job: Job, event: JobStarted, seq: int) -> Job:
    return msgspec.structs.replace(
        job, status=Status.RUNNING, attempts=event.attempt, started_at=event.at,
        retry_at=None, worker=event.worker, progress=0.0, progress_message="",
        current_path=layout.processing_path(job),
        updated_at=event.at, version=job.version + 1, seq=seq)


def _progressed(job: Job, event: JobProgress, seq: int) -> Job:
    return msgspec.structs.replace(
        job, progress=event.fraction, progress_message=event.message,
        updated_at=event.at, version=job.version + 1, seq=seq)


def _failed(job: Job, event: JobFailed, seq: int) -> Job:
    error = ErrorInfo(type=event.error_type, message=event.message, traceback=event.traceback)
    if event.retry_at is None:  # final
        return msgspec.structs.replace(
            job, status=Status.FAILED, error=error, retry_at=None, finished_at=event.at,
            current_path=layout.error_path(job),
            updated_at=event.at, version=job.version + 1, seq=seq)
    # A retry waits in processing/ where the failed attempt left its file.
    return msgspec.structs.replace(
        job, status=Status.PENDING, error=error, retry_at=event.retry_at,
        updated_at=event.at, version=job.version + 1, seq=seq)


def _completed(job: Job, event: JobCompleted, seq: int) -> Job:
    return msgspec.structs.replace(
        job, status=Status.COMPLETED, progress=1.0, result=event.result,
        output_paths=tuple(event.output_paths), finished_at=event.at, error=None,
        current_path=layout.archive_path(job, event.at),
        updated_at=event.at, version=job.version + 1, seq=seq)


def _cancelled(job: Job, event: JobCancelled, seq: int) -> Job:
    return msgspec.structs.replace(
        job, status=Status.CANCELLED, finished_at=event.at, retry_at=None,
        error=ErrorInfo(type="Cancelled", message=event.reason, actor=event.actor),
        current_path=layout.error_path(job),
        updated_at=event.at, version=job.version + 1, seq=seq)


def _retried(job: Job, event: JobRetried, seq: int) -> Job:
    # The file stays in error/ until the next claim moves it to processing/.
    return msgspec.structs.replace(
        job, status=Status.PENDING, finished_at=None, retry_at=None, progress=0.0,
        progress_message="", updated_at=event.at, version=job.version + 1, seq=seq)


def _duplicate(job: Job, event: JobDuplicateReceived, seq: int) -> Job:
    return msgspec.structs.replace(
        job, duplicates=job.duplicates + 1, updated_at=event.at, version=job.version + 1,
        seq=seq)


_STEPS: dict[type[Event], Callable[[Job, Any, int], Job]] = {
    JobStarted: _started,
    JobProgress: _progressed,
    JobFailed: _failed,
    JobCompleted: _completed,
    JobCancelled: _cancelled,
    JobRetried: _retried,
    JobDuplicateReceived: _duplicate,
}


def _created(event: JobCreated) -> Job:
    return Job(
        id=event.job_id,
        workflow_name=event.workflow_name,
        file_path=event.file_path,
        current_path=event.file_path,
        channel_name=event.channel_name,
        priority=event.priority,
        params=event.params,
        completeness=event.completeness,
        idempotency_key=event.idempotency_key,
        created_at=event.at,
        updated_at=event.at,
        version=1,
    )


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event as the log holds it: its global seq, per-job version and chain hash."""

    seq: int
    job_id: str
    version: int
    event: AnyEvent
    hash: str = ""


def apply(job: Job | None, stored: StoredEvent) -> Job:
    """Fold one stored event: `evolve`, stamped with the log position it reflects."""
    if job is not None and stored.job_id != job.id:
        raise ValueError(f"event of job {stored.job_id} applied to job {job.id}")
    return fold_stored(job, stored.event, stored.seq, stored.version)


def fold_stored(job: Job | None, event: Event, seq: int, version: int) -> Job:
    """`apply` without building a StoredEvent: the fast path of rebuilds and replays."""
    new = _fold(job, event, seq)
    if new.version != version:
        raise ValueError(f"job {event.job_id}: stored version {version}, "
                         f"but the fold is at version {new.version}")
    return new


def replay(stored_events: list[StoredEvent]) -> dict[str, Job]:
    """Fold a log (in seq order) into every job's state: the independent oracle of a store."""
    jobs: dict[str, Job] = {}
    for stored in stored_events:
        jobs[stored.job_id] = apply(jobs.get(stored.job_id), stored)
    return jobs
