"""The API's wire shapes: msgspec Structs, from which /openapi.json is generated."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from kernel.events import PRIORITY_MAX, PRIORITY_MIN, encode_event
from kernel.state import Job, Status, StoredEvent

Priority = Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX,
                                        description="-100..100, higher runs first")]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
# A name is kept in the job's row as given: no control characters (a NUL, say, which no
# PostgreSQL text column takes; the kernel refuses them too).
# (A lookahead over the whole string: with `...$`, a final line break would pass.)
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255,
                                   pattern=r"^(?![\s\S]*[\x00-\x1f\x7f])")]
FilePath = Annotated[str, msgspec.Meta(min_length=1, max_length=4096,
                                        description="relative to the workflow's input/")]


class ErrorOut(msgspec.Struct, frozen=True):
    type: str
    message: str


class JobOut(msgspec.Struct, frozen=True, kw_only=True):
    """A job as the API shows it (times RFC 3339 UTC, paths relative to the data root)."""

    id: str
    workflow_name: str
    file_path: str
    current_path: str
    channel_name: str | None
    priority: int
    status: Status
    attempts: int
    progress: float
    progress_message: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    retry_at: datetime | None
    error: ErrorOut | None
    result: dict[str, Any] | None
    output_paths: list[str]
    duplicates: int = 0
    version: int = 0  # events in the job's history
    seq: int = 0  # the log position of its last event

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """The API view of a job."""
        error = ErrorOut(type=job.error.type, message=job.error.message) if job.error else None
        return cls(
            id=job.id, workflow_name=job.workflow_name, file_path=job.file_path,
            current_path=job.current_path, channel_name=job.channel_name, priority=job.priority,
            status=job.status, attempts=job.attempts, progress=job.progress,
            progress_message=job.progress_message, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at, retry_at=job.retry_at,
            error=error, result=job.result, output_paths=list(job.output_paths),
            duplicates=job.duplicates, version=job.version, seq=job.seq,
        )


class JobList(msgspec.Struct, frozen=True):
    items: list[JobOut]
    next_cursor: str | None


class CreateJob(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/jobs: a file already in the workflow's input/ folder becomes a job."""

    workflow_name: Name
    file_path: FilePath
    channel_name: Name | None = None
    priority: Priority = 0


class Reason(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of cancel and retry (optional)."""

    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event: its place in the log, its chain hash and its data."""

    seq: int
    job_id: str
    version: int
    type: str
    at: datetime
    hash: str
    data: dict[str, Any]


class WorkflowStatus(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/{workflow}/status/{task_id}: the job and the workflow's own result."""

    job: JobOut
    result: dict[str, Any] | None


class WorkflowOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    enabled: bool
    concurrency: int | None
    timeout_s: float | None
    max_attempts: int
    params_schema: dict[str, Any]
    problem: str | None = None


class QueueBucket(msgspec.Struct, frozen=True):
    workflow_name: str
    priority: int
    depth: int


class QueueOut(msgspec.Struct, frozen=True, kw_only=True):
    depth: int
    running: int
    running_jobs: list[str]
    by_workflow: dict[str, int]
    buckets: list[QueueBucket]
    claiming: bool
    last_seq: int = 0  # the log's newest event: where a live stream should start


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str = ""


class Health(msgspec.Struct, frozen=True):
    status: str
    checks: list[Check]


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem: application/problem+json."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = None
    instance: str | None = None


_event_data = msgspec.json.Decoder(dict[str, Any])


def event_out(stored: StoredEvent) -> EventOut:
    """The API view of a stored event."""
    data = _event_data.decode(encode_event(stored.event))
    kind = data.pop("type")
    data.pop("job_id", None)
    data.pop("at", None)
    return EventOut(seq=stored.seq, job_id=stored.job_id, version=stored.version, type=kind,
                    at=stored.event.at, hash=stored.hash, data=data)
