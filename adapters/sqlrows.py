"""What the SQL stores share: the read-model row of a job and the listing's WHERE clause."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from adapters.memory import decode_cursor
from adapters.notify.records import AlertRecord, DeadLetter
from kernel.ports import JobQuery
from kernel.state import Job

JOB_COLUMNS = ("id, workflow_name, file_path, status, channel_name, priority, idempotency_key, "
               "created_us, updated_us, created_seq, seq, version, body")
ACTIVE_SQL = "('pending', 'running')"
# An update of an existing row, never a replace: a replace would silently delete another
# job's row that conflicts on a unique index, instead of failing the append.
UPSERT_JOB = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES "
    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
    "status = excluded.status, channel_name = excluded.channel_name, "
    "priority = excluded.priority, updated_us = excluded.updated_us, seq = excluded.seq, "
    "version = excluded.version, body = excluded.body")
job_decoder = msgspec.json.Decoder(Job)
_job_encoder = msgspec.json.Encoder()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(at: datetime) -> int:
    """A datetime as integer microseconds since the epoch (exact; sortable in SQL)."""
    return (at - _EPOCH) // _MICROSECOND


def job_row(job: Job) -> tuple[object, ...]:
    """The `jobs` table's columns for a job, in JOB_COLUMNS order."""
    return (
        job.id, job.workflow_name, job.file_path, str(job.status), job.channel_name,
        job.priority, job.idempotency_key, micros(job.created_at), micros(job.updated_at),
        job.created_seq, job.seq, job.version, _job_encoder.encode(job).decode(),
    )


def job_values(job: Job) -> tuple[object, ...]:
    """`job_row` without id, seq and version (the SQLite writer takes those from the event)."""
    return (
        job.workflow_name, job.file_path, job.status.value, job.channel_name, job.priority,
        job.idempotency_key, micros(job.created_at), micros(job.updated_at), job.created_seq,
        _job_encoder.encode(job).decode(),
    )


def where_clause(query: JobQuery, mark: str) -> tuple[str, list[object]]:
    """The WHERE clause of a job listing and its parameters; `mark` is `?` or `%s`."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (
        ("created_seq <", decode_cursor(query.cursor)),
        ("workflow_name =", query.workflow_name),
        ("status =", None if query.status is None else str(query.status)),
        ("channel_name =", query.channel_name),
        ("created_us >=", None if query.created_after is None else micros(query.created_after)),
        ("created_us <", None if query.created_before is None else micros(query.created_before)),
    ):
        if value is not None:
            clauses.append(f"{column} {mark}")
            params.append(value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def dead_letter_of(row: Sequence[Any]) -> DeadLetter:
    """A dead letter from its row: id, target, seq, job_id, event_type, attempts, error, time."""
    return DeadLetter(id=row[0], target=row[1], seq=row[2], job_id=row[3], event_type=row[4],
                      attempts=row[5], last_error=row[6], created_at=datetime.fromisoformat(row[7]))


def alert_of(row: Sequence[Any]) -> AlertRecord:
    """An alert record from its row: id, rule, state, at, detail."""
    return AlertRecord(id=row[0], rule=row[1], state=row[2], at=datetime.fromisoformat(row[3]),
                       detail=row[4])
