"""The job events: immutable facts, appended to the log and never edited.

Wire tags (`type`) are stable dotted names and are never renamed; a new field
always gets a default, so old logs keep decoding.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

PRIORITY_MIN = -100
PRIORITY_MAX = 100


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of every job event: which job, and when (from the Clock port)."""

    job_id: str
    at: datetime


class JobCreated(Event, frozen=True, tag="job.created"):
    """A job exists for a file; it is pending until intake and a worker take it."""

    workflow_name: str
    file_path: str  # relative to the data root: "{workflow}/input/{name}"
    channel_name: str | None = None
    priority: int = 0
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    completeness: str = "submitted"  # how the file was judged complete: "stable:500ms", "marker"
    idempotency_key: str | None = None


class JobStarted(Event, frozen=True, tag="job.started"):
    """A worker claimed the job; this is attempt number `attempt` (1-based)."""

    attempt: int
    worker: str = ""


class JobProgress(Event, frozen=True, tag="job.progress"):
    """The processor reported how far it is (0..1)."""

    fraction: float
    message: str = ""


class JobFailed(Event, frozen=True, tag="job.failed"):
    """An attempt failed, or intake refused the file; `retry_at` None means final."""

    error_type: str
    message: str
    traceback: str = ""
    attempt: int = 0  # 0: refused at intake, before any attempt
    retry_at: datetime | None = None


class JobCompleted(Event, frozen=True, tag="job.completed"):
    """The processor finished: its result and the files it wrote (data-root relative)."""

    attempt: int
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    output_paths: list[str] = msgspec.field(default_factory=list)


class JobCancelled(Event, frozen=True, tag="job.cancelled"):
    """Someone (an API token's name, or `cli`) cancelled a pending or running job."""

    actor: str
    reason: str = ""


class JobRetried(Event, frozen=True, tag="job.retried"):
    """An operator sent a finally failed (or cancelled) job back to the queue."""

    actor: str
    reason: str = ""


class JobDuplicateReceived(Event, frozen=True, tag="job.duplicate_received"):
    """A file identical to this job's (same sha256) was dropped again and not processed."""

    file_path: str  # where the identical file was dropped, relative to the data root
    stored_path: str  # where its bytes were kept instead, relative to the data root
    sha256: str = ""


AnyEvent = (
    JobCreated
    | JobStarted
    | JobProgress
    | JobFailed
    | JobCompleted
    | JobCancelled
    | JobRetried
    | JobDuplicateReceived
)

EVENT_TYPES: tuple[type[Event], ...] = (
    JobCreated,
    JobStarted,
    JobProgress,
    JobFailed,
    JobCompleted,
    JobCancelled,
    JobRetried,
    JobDuplicateReceived,
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    """The event's JSON payload, tag included: the bytes the log stores."""
    return _encoder.encode(event)


def decode_event(payload: bytes | str) -> AnyEvent:
    """Decode one stored payload back into its event class."""
    return _decoder.decode(payload)


def event_tag(event: Event) -> str:
    """The wire tag of an event (`job.created` ...)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag
