"""The append rules every store shares: version check, one active job per file, chain.

A store has exactly one writer; the writer keeps a `Ledger` (the log's head and
the active jobs, by id and by file) and prepares each batch of appends in a
`Batch` overlay. Only once the batch is durable does the ledger take it, so a
failed commit (a full disk) leaves the ledger as the disk is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from kernel.chain import GENESIS, link
from kernel.events import Event, JobCreated, JobRetried, encode_event, event_tag
from kernel.ports import Append, ConcurrencyConflict, DuplicateJob, NotAfter, StoreError
from kernel.state import Job, StoredEvent, apply

FileKey = tuple[str, str]  # (workflow_name, file_path)


class Row:
    """One event ready to insert: its columns, and the StoredEvent the caller gets back."""

    __slots__ = ("payload", "stored", "type_tag")

    def __init__(self, stored: StoredEvent, type_tag: str, payload: bytes) -> None:
        self.stored = stored
        self.type_tag = type_tag
        self.payload = payload


class Ledger:
    """The single writer's view of the log head and of every active job."""

    def __init__(self, last_seq: int = 0, last_hash: str = GENESIS) -> None:
        self.last_seq = last_seq
        self.last_hash = last_hash
        self.active: dict[str, Job] = {}
        self.files: dict[FileKey, str] = {}

    def load_active(self, jobs: Sequence[Job]) -> None:
        """Seed the active-job indexes (at open, from the read model)."""
        for job in jobs:
            self.active[job.id] = job
            self.files[(job.workflow_name, job.file_path)] = job.id

    def begin(
        self,
        load_job: Callable[[str], Job | None],
        load_key: Callable[[str, str], str | None],
    ) -> Batch:
        """Start a batch; `load_job`/`load_key` read what the ledger does not keep."""
        return Batch(self, load_job, load_key)

    def commit(self, batch: Batch) -> None:
        """Take a batch that is now durable."""
        self.last_seq, self.last_hash = batch.last_seq, batch.last_hash
        for key, owner in batch.files.items():
            if owner is None:
                self.files.pop(key, None)
            else:
                self.files[key] = owner
        for job in batch.jobs.values():
            if job.is_active:
                self.active[job.id] = job
            else:
                self.active.pop(job.id, None)


class Batch:
    """Appends prepared against the ledger, not yet durable."""

    def __init__(
        self,
        ledger: Ledger,
        load_job: Callable[[str], Job | None],
        load_key: Callable[[str, str], str | None],
    ) -> None:
        self.ledger = ledger
        self.load_job = load_job
        self.load_key = load_key
        self.last_seq = ledger.last_seq
        self.last_hash = ledger.last_hash
        self.jobs: dict[str, Job] = {}
        self.files: dict[FileKey, str | None] = {}
        self.keys: dict[tuple[str, str], str] = {}
        self.rows: list[Row] = []

    def current(self, job_id: str) -> Job | None:
        """The job as the batch sees it: its own changes, then the ledger, then the store."""
        if job_id in self.jobs:
            return self.jobs[job_id]
        job = self.ledger.active.get(job_id)
        return job if job is not None else self.load_job(job_id)

    def try_prepare(self, job_id: str, events: Sequence[Event], expected_version: int
                    ) -> list[Row] | StoreError:
        """`prepare`, with a refusal returned instead of raised: the append's own error, or
        a StoreError for events that cannot be encoded (a value msgspec refuses, a result
        nested past the recursion limit). One such append never fails its neighbours."""
        try:
            return self.prepare(job_id, events, expected_version)
        except StoreError as exc:
            return exc
        except (ValueError, TypeError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
            # What encoding can refuse; a store's own failure (a read) is not the events'.
            return StoreError(f"the event cannot be stored: {type(exc).__name__}: {exc}"[:2000])

    def prepare(self, job_id: str, events: Sequence[Event], expected_version: int) -> list[Row]:
        """Check one append and stage its rows; raises without staging anything."""
        job = self.current(job_id)
        actual = job.version if job is not None else 0
        if actual != expected_version:
            raise ConcurrencyConflict(job_id, expected_version, actual)
        new_job = job
        rows: list[Row] = []
        seq, prev = self.last_seq, self.last_hash
        for event in events:
            if event.job_id != job_id:
                raise StoreError(f"event for job {event.job_id} appended to job {job_id}")
            self._check_owner(new_job, event)
            seq += 1
            payload = encode_event(event)
            tag = event_tag(event)
            version = (new_job.version if new_job else 0) + 1
            prev = link(prev, seq, job_id, version, tag, payload)
            stored = StoredEvent(seq=seq, job_id=job_id, version=version, event=event, hash=prev)  # type: ignore[arg-type]
            new_job = apply(new_job, stored)
            rows.append(Row(stored, tag, payload))
        self._stage(job, new_job, rows, seq, prev)
        return rows

    def _check_owner(self, job: Job | None, event: Event) -> None:
        if isinstance(event, JobCreated):
            owner = self._file_owner((event.workflow_name, event.file_path))
            if owner is not None:
                raise DuplicateJob(owner, "the file already has an active job")
            if event.idempotency_key is not None:
                key = (event.workflow_name, event.idempotency_key)
                earlier = self.keys.get(key) or self.load_key(*key)
                if earlier is not None:
                    raise DuplicateJob(earlier, "the idempotency key was used before")
        elif isinstance(event, JobRetried) and job is not None:
            owner = self._file_owner((job.workflow_name, job.file_path))
            if owner is not None and owner != job.id:
                raise DuplicateJob(owner, "another active job now holds the file")

    def _file_owner(self, key: FileKey) -> str | None:
        if key in self.files:
            return self.files[key]
        return self.ledger.files.get(key)

    def _stage(self, old: Job | None, new: Job | None, rows: list[Row], seq: int, h: str) -> None:
        if new is None:
            return
        key = (new.workflow_name, new.file_path)
        if new.is_active:
            self.files[key] = new.id
        elif old is not None and old.is_active:
            self.files[key] = None
        if new.idempotency_key is not None:
            self.keys[(new.workflow_name, new.idempotency_key)] = new.id
        self.jobs[new.id] = new
        self.rows.extend(rows)
        self.last_seq, self.last_hash = seq, h


def conditions(appends: Sequence[Append]) -> list[tuple[int, ...]]:
    """For each append, the indexes of the appends it depends on (`Append.if_all_before`):
    the unmarked ones before it in its batch; () for an unmarked one."""
    before: list[int] = []
    out: list[tuple[int, ...]] = []
    for index, append in enumerate(appends):
        if append.if_all_before:
            out.append(tuple(before))
        else:
            out.append(())
            before.append(index)
    return out


def unmet(job_id: str) -> NotAfter:
    """The refusal of an append whose batch's earlier appends were not all stored."""
    return NotAfter(f"job {job_id} not claimed: the append before it was refused")


class Linked(Protocol):
    """A store's pending append, linked to those it depends on (`conditions`)."""

    error: StoreError | None

    @property
    def job_id(self) -> str: ...
    @property
    def requires(self) -> Sequence[Linked]: ...


def refuse_if_unmet(request: Linked) -> bool:
    """Refuse (`unmet`) a request whose batch's earlier appends were not all stored."""
    if any(required.error is not None for required in request.requires):
        request.error = unmet(request.job_id)
        return True
    return False
