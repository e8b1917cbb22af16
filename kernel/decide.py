"""Commands and the pure decider: `decide(job, command) -> events`, or `Rejected`."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import msgspec

from kernel.events import (
    PRIORITY_MAX,
    PRIORITY_MIN,
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
from kernel.state import ACTIVE, Job, Status


class Rejected(Exception):
    """A command that the job's current state does not allow; nothing was written."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code  # "not_found", "exists", "invalid_transition", "stale_attempt", "invalid"
        self.detail = detail


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every command: which job, and when it is asked (from the Clock port)."""

    job_id: str
    at: datetime


class CreateJob(Command, frozen=True):
    workflow_name: str
    file_path: str
    channel_name: str | None = None
    priority: int = 0
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    completeness: str = "submitted"
    idempotency_key: str | None = None


class StartJob(Command, frozen=True):
    worker: str = ""


class ReportProgress(Command, frozen=True):
    attempt: int
    fraction: float
    message: str = ""


class CompleteJob(Command, frozen=True):
    attempt: int
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    output_paths: list[str] = msgspec.field(default_factory=list)


class FailJob(Command, frozen=True):
    """An attempt failed; `retry_at` comes from the workflow's retry policy (None: final)."""

    attempt: int
    error_type: str
    message: str
    traceback: str = ""
    retry_at: datetime | None = None


class RefuseAtIntake(Command, frozen=True):
    """The intake checks refused the file: the job fails finally before any attempt."""

    error_type: str
    message: str


class CancelJob(Command, frozen=True):
    actor: str
    reason: str = ""


class RetryJob(Command, frozen=True):
    actor: str
    reason: str = ""


class RecordDuplicate(Command, frozen=True):
    """An identical file was dropped again: record it against this job (any status)."""

    file_path: str
    stored_path: str
    sha256: str = ""


AnyCommand = (
    CreateJob
    | StartJob
    | ReportProgress
    | CompleteJob
    | FailJob
    | RefuseAtIntake
    | CancelJob
    | RetryJob
    | RecordDuplicate
)


def decide(job: Job | None, command: AnyCommand) -> list[Event]:
    """The events a command produces from the job's current state, or raise `Rejected`."""
    if isinstance(command, CreateJob):
        return _create(job, command)
    if job is None:
        raise Rejected("not_found", f"job {command.job_id} does not exist")
    match command:
        case StartJob():
            return _start(job, command)
        case ReportProgress():
            _require_attempt(job, command.attempt)
            fraction = 0.0 if math.isnan(command.fraction) else command.fraction
            fraction = min(1.0, max(0.0, fraction))
            return [JobProgress(job_id=job.id, at=command.at, fraction=fraction,
                                message=command.message)]
        case CompleteJob():
            _require_attempt(job, command.attempt)
            return [JobCompleted(job_id=job.id, at=command.at, attempt=command.attempt,
                                 result=command.result, output_paths=command.output_paths)]
        case FailJob():
            _require_attempt(job, command.attempt)
            return [JobFailed(job_id=job.id, at=command.at, attempt=command.attempt,
                              error_type=command.error_type, message=command.message,
                              traceback=command.traceback, retry_at=command.retry_at)]
        case RefuseAtIntake():
            return _refuse(job, command)
        case CancelJob():
            return _cancel(job, command)
        case RetryJob():
            return _retry(job, command)
        case RecordDuplicate():
            return [JobDuplicateReceived(job_id=job.id, at=command.at,
                                         file_path=command.file_path,
                                         stored_path=command.stored_path,
                                         sha256=command.sha256)]
    raise Rejected("invalid", f"unknown command {type(command).__name__}")


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a C0 control character or DEL (a NUL, a tab, a line break)."""
    return any(ord(c) < 32 or c == "\x7f" for c in text)


def _create(job: Job | None, command: CreateJob) -> list[Event]:
    if job is not None:
        raise Rejected("exists", f"job {command.job_id} already exists")
    if not PRIORITY_MIN <= command.priority <= PRIORITY_MAX:
        raise Rejected("invalid", f"priority must be within {PRIORITY_MIN}..{PRIORITY_MAX}")
    for field, value in (("channel_name", command.channel_name),
                         ("idempotency_key", command.idempotency_key)):
        # Kept in the job's row as they are: a NUL, say, no PostgreSQL text column takes.
        if value is not None and has_control_characters(value):
            raise Rejected("invalid", f"{field} must not contain control characters")
    return [
        JobCreated(
            job_id=command.job_id,
            at=command.at,
            workflow_name=command.workflow_name,
            file_path=command.file_path,
            channel_name=command.channel_name,
            priority=command.priority,
            params=command.params,
            completeness=command.completeness,
            idempotency_key=command.idempotency_key,
        )
    ]


def _start(job: Job, command: StartJob) -> list[Event]:
    if job.status is not Status.PENDING:
        raise Rejected("invalid_transition", f"job {job.id} is {job.status}, not pending")
    if job.retry_at is not None and job.retry_at > command.at:
        raise Rejected("invalid_transition", f"job {job.id} waits until {job.retry_at}")
    return [JobStarted(job_id=job.id, at=command.at, attempt=job.attempts + 1,
                       worker=command.worker)]


def _require_attempt(job: Job, attempt: int) -> None:
    # Fencing: only the attempt that holds the job may report on it.
    if job.status is not Status.RUNNING:
        raise Rejected("invalid_transition", f"job {job.id} is {job.status}, not running")
    if attempt != job.attempts:
        raise Rejected("stale_attempt", f"attempt {attempt} of job {job.id} is not current")


def _refuse(job: Job, command: RefuseAtIntake) -> list[Event]:
    if job.status is not Status.PENDING or job.attempts != 0:
        raise Rejected("invalid_transition", f"job {job.id} is past intake")
    return [JobFailed(job_id=job.id, at=command.at, attempt=0, error_type=command.error_type,
                      message=command.message, retry_at=None)]


def _cancel(job: Job, command: CancelJob) -> list[Event]:
    if job.status not in ACTIVE:
        raise Rejected("invalid_transition", f"job {job.id} is {job.status}: nothing to cancel")
    return [JobCancelled(job_id=job.id, at=command.at, actor=command.actor,
                         reason=command.reason)]


def _retry(job: Job, command: RetryJob) -> list[Event]:
    if job.status not in (Status.FAILED, Status.CANCELLED):
        raise Rejected("invalid_transition",
                       f"job {job.id} is {job.status}: only failed or cancelled jobs are retried")
    return [JobRetried(job_id=job.id, at=command.at, actor=command.actor, reason=command.reason)]
