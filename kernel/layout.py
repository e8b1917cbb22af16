"""Where a job's file lives at each stage: pure path rules, relative to the data root.

`{workflow}/input/{name}` -> `{workflow}/processing/{job_id}--{name}` ->
`{workflow}/archive/{yyyy-mm-dd}/{job_id}--{name}` (UTC date of completion) or
`{workflow}/error/{job_id}--{name}` (final failure or cancellation).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Protocol

STAGES = ("input", "processing", "output", "archive", "error")
WORKFLOW_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Words the HTTP API uses under /api/ itself, so no workflow may take them.
RESERVED_NAMES = frozenset(
    {
        "jobs", "events", "queue", "workflows", "alerts", "notifications", "logs", "metrics",
        "health", "healthz", "readyz", "livez", "docs", "openapi", "static", "api", "admin",
        "auth", "token", "tokens", "status", "config", "settings", "dashboard",
    }
)


class HasFile(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def workflow_name(self) -> str: ...
    @property
    def file_path(self) -> str: ...


def check_workflow_name(name: str) -> str | None:
    """Why `name` cannot be a workflow's name, or None when it can."""
    if not WORKFLOW_NAME.match(name):
        return "must match ^[a-z][a-z0-9_]{0,63}$"
    if name in RESERVED_NAMES:
        return f"{name!r} is reserved by the API"
    return None


def input_path(workflow_name: str, name: str) -> str:
    """The data-root relative path of a file in a workflow's hot folder."""
    return f"{workflow_name}/input/{name}"


NAME_MAX = 255  # bytes in one path segment (ext4, xfs, btrfs, tmpfs)
REPORT_SUFFIX = ".error.json"  # the failure report written beside a file in error/
_EXTENSION_MAX = 16  # bytes of an extension kept whole when a name is shortened


def fit_name(name: str, room: int) -> str:
    """`name` shortened to at most `room` bytes of UTF-8, its stem cut (and marked `~`)
    and its extension kept; a name that fits is returned as it is. Bytes that are not
    UTF-8 (a name read with surrogateescape) count, and stay, as the bytes they are."""
    if len(name) * 4 <= room:  # fits whatever its characters (4 bytes at most each)
        return name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    stem, dot, extension = raw.rpartition(b".")
    if not dot or not stem or len(extension) + 1 > _EXTENSION_MAX:
        stem, extension = raw, b""
    else:
        extension = b"." + extension
    keep = max(0, room - len(extension) - 1)
    while 0 < keep < len(stem) and stem[keep] & 0xC0 == 0x80:
        keep -= 1  # never split a character's bytes
    return (stem[:keep] + b"~" + extension).decode("utf-8", "surrogateescape")


def stored_name(job: HasFile) -> str:
    """The file's name once it belongs to a job: `{job_id}--{name}`, the name shortened
    where that and its report's suffix would pass NAME_MAX (the log keeps it whole)."""
    prefix = f"{job.id}--"
    return prefix + fit_name(job.file_path.rpartition("/")[2],
                             NAME_MAX - len(prefix.encode()) - len(REPORT_SUFFIX))


def processing_path(job: HasFile) -> str:
    """Where the file lies while an attempt works on it (and between retries)."""
    return f"{job.workflow_name}/processing/{stored_name(job)}"


def archive_path(job: HasFile, at: datetime) -> str:
    """Where a completed job's input rests: dated by the UTC day of completion."""
    utc = at if at.tzinfo is UTC else at.astimezone(UTC)
    day = f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
    return f"{job.workflow_name}/archive/{day}/{stored_name(job)}"


def error_path(job: HasFile) -> str:
    """Where a finally failed or cancelled job's input rests, beside its `.error.json`."""
    return f"{job.workflow_name}/error/{stored_name(job)}"


def output_dir(workflow_name: str) -> str:
    """The workflow's output folder, relative to the data root."""
    return f"{workflow_name}/output"


def duplicate_path(job: HasFile, name: str, at: datetime) -> str:
    """Where the bytes of a dropped duplicate of `job`'s file are kept."""
    utc = at if at.tzinfo is UTC else at.astimezone(UTC)
    stamp = f"{utc:%Y%m%dT%H%M%S%f}"
    prefix = f"{job.id}--{stamp}--"
    kept = fit_name(name.rpartition("/")[2], NAME_MAX - len(prefix.encode()))
    return f"{job.workflow_name}/archive/duplicates/{prefix}{kept}"
