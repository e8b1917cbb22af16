"""A second fold of the log, for `multiflow rebuild` only: the read-model rows, fast.

Why a second fold exists: the kernel's `fold_stored` makes a new frozen `Job` per event
(`msgspec.structs.replace` of every field, the file path recomputed at every claim) and
`job_row` encodes through the kw-only `Job`; on a log of a million events that was ~10x
the cost of decoding it. Here a job is a plain list in `Job`'s field order: an event
sets only the slots it changes, the file path is computed once per row, and the row is
encoded through a positional copy of `Job` (`_Body`, made from `Job`'s own fields).

It must give exactly `job_row` of the kernel's fold, byte for byte. tests/property/
test_rebuild_fold.py folds generated logs both ways (every event type with every field
varied, retries, cancels, duplicates, revived jobs, refusals at intake) and compares the
rows, so a change to `kernel.state` that this module misses fails that test. Events are
decoded with the kernel's own decoder: a payload the kernel refuses is refused here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from adapters.sqlrows import micros
from kernel import layout
from kernel.events import (
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobDuplicateReceived,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
    decode_event,
)
from kernel.ports import StoreError
from kernel.state import ErrorInfo, Job, Status

State = list[Any]  # one job: the values of Job's fields, in Job's order
Row = tuple[Any, ...]  # a `jobs` row, in JOB_COLUMNS order
Stored = tuple[int, str, int, "str | bytes"]  # seq, job_id, version, payload

_FIELDS = msgspec.structs.fields(Job)
_NAMES = tuple(field.name for field in _FIELDS)
# Job's fields, positional and mutable: encodes to the same JSON as the Job would.
_Body = msgspec.defstruct("Job", [(field.name, field.type) for field in _FIELDS])
_encode = msgspec.json.Encoder().encode
_heads_decoder = msgspec.json.Decoder(list[tuple[Any, ...]])
(ID, WORKFLOW, FILE, CURRENT, CHANNEL, PRIORITY, PARAMS, KEY, STATUS, ATTEMPTS, PROGRESS,
 MESSAGE, CREATED_AT, UPDATED_AT, STARTED_AT, FINISHED_AT, RETRY_AT, ERROR, RESULT, OUTPUTS,
 DUPLICATES, WORKER, VERSION, SEQ, CREATED_SEQ, COMPLETENESS) = (
    _NAMES.index(name) for name in (
        "id", "workflow_name", "file_path", "current_path", "channel_name", "priority",
        "params", "idempotency_key", "status", "attempts", "progress", "progress_message",
        "created_at", "updated_at", "started_at", "finished_at", "retry_at", "error",
        "result", "output_paths", "duplicates", "worker", "version", "seq", "created_seq",
        "completeness"))
_PENDING, _RUNNING, _COMPLETED, _FAILED, _CANCELLED = (
    Status.PENDING.value, Status.RUNNING.value, Status.COMPLETED.value, Status.FAILED.value,
    Status.CANCELLED.value)
ACTIVE = frozenset({_PENDING, _RUNNING})
# current_path is made when the row is built; until then the slot may hold a marker: the
# processing or error folder, or the completion's time (the archive folder of that day).
_PROCESSING, _ERROR = 1, 2


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return None if field.required else field.default


_DEFAULTS = [_default(field) for field in _FIELDS]
# Mutable defaults are made anew for each job, as Job's default factories do.
_FACTORIES = tuple((index, field.default_factory) for index, field in enumerate(_FIELDS)
                   if field.default_factory is not msgspec.NODEFAULT and index != PARAMS)


def created_state(event: JobCreated, seq: int) -> State:
    """A new job's state: `evolve(None, JobCreated)` stamped with its seq."""
    state = _DEFAULTS.copy()
    for index, factory in _FACTORIES:
        state[index] = factory()
    state[ID] = event.job_id
    state[WORKFLOW] = event.workflow_name
    state[FILE] = state[CURRENT] = event.file_path
    state[CHANNEL] = event.channel_name
    state[PRIORITY] = event.priority
    state[PARAMS] = event.params
    state[COMPLETENESS] = event.completeness
    state[KEY] = event.idempotency_key
    state[STATUS] = _PENDING
    state[CREATED_AT] = state[UPDATED_AT] = event.at
    state[VERSION] = 1
    state[SEQ] = state[CREATED_SEQ] = seq
    return state


def state_of(job: Job) -> State:
    """A job read back from the table, as a state the fold can go on with."""
    return list(msgspec.structs.astuple(job))


# One function per event type after JobCreated; the fold sets updated_at, version and seq,
# which every one of them changes.

def _started(state: State, event: JobStarted) -> None:
    state[STATUS] = _RUNNING
    state[ATTEMPTS] = event.attempt
    state[STARTED_AT] = event.at
    state[RETRY_AT] = None
    state[WORKER] = event.worker
    state[PROGRESS] = 0.0
    state[MESSAGE] = ""
    state[CURRENT] = _PROCESSING


def _progressed(state: State, event: JobProgress) -> None:
    state[PROGRESS] = event.fraction
    state[MESSAGE] = event.message


def _failed(state: State, event: JobFailed) -> None:
    state[ERROR] = ErrorInfo(type=event.error_type, message=event.message,
                             traceback=event.traceback)
    if event.retry_at is None:
        state[STATUS] = _FAILED
        state[RETRY_AT] = None
        state[FINISHED_AT] = event.at
        state[CURRENT] = _ERROR
    else:  # the file waits in processing/ where the failed attempt left it
        state[STATUS] = _PENDING
        state[RETRY_AT] = event.retry_at


def _completed(state: State, event: JobCompleted) -> None:
    state[STATUS] = _COMPLETED
    state[PROGRESS] = 1.0
    state[RESULT] = event.result
    state[OUTPUTS] = list(event.output_paths)
    state[FINISHED_AT] = event.at
    state[ERROR] = None
    state[CURRENT] = event.at


def _cancelled(state: State, event: JobCancelled) -> None:
    state[STATUS] = _CANCELLED
    state[FINISHED_AT] = event.at
    state[RETRY_AT] = None
    state[ERROR] = ErrorInfo(type="Cancelled", message=event.reason, actor=event.actor)
    state[CURRENT] = _ERROR


def _retried(state: State, event: JobRetried) -> None:
    state[STATUS] = _PENDING
    state[FINISHED_AT] = None
    state[RETRY_AT] = None
    state[PROGRESS] = 0.0
    state[MESSAGE] = ""


def _duplicate(state: State, event: JobDuplicateReceived) -> None:
    state[DUPLICATES] += 1


_STEPS: dict[type, Callable[[State, Any], None]] = {
    JobStarted: _started,
    JobProgress: _progressed,
    JobFailed: _failed,
    JobCompleted: _completed,
    JobCancelled: _cancelled,
    JobRetried: _retried,
    JobDuplicateReceived: _duplicate,
}


class FastFold:
    """Folds stored events in seq order into job states.

    `load(job_id)` gives back a job handed out as finished already (it has more events:
    an operator's retry, a dropped duplicate), or None when the log never created it.
    """

    def __init__(self, load: Callable[[str], Job | None]) -> None:
        self.jobs: dict[str, State] = {}
        self.load = load
        self.created = 0

    def fold(self, stored: Iterable[Stored]) -> None:
        """Apply events in seq order."""
        jobs, steps, decode = self.jobs, _STEPS, decode_event
        for seq, job_id, version, payload in stored:
            event = decode(payload)
            state = jobs.get(job_id)
            if state is None:
                state = self._first(job_id, event, seq, version)
                if state is None:
                    continue
            step = steps.get(event.__class__)
            if step is None or state[VERSION] + 1 != version:
                raise _inconsistent(job_id, event, seq, version, state)
            step(state, event)
            state[UPDATED_AT] = event.at
            state[VERSION] = version
            state[SEQ] = seq

    def _first(self, job_id: str, event: Any, seq: int, version: int) -> State | None:
        # A job not held: created here (then done with this event), or one more event of a
        # job handed out finished (then go on from its row).
        if event.__class__ is JobCreated:
            if version != 1:
                raise _inconsistent(job_id, event, seq, version, None)
            self.jobs[job_id] = created_state(event, seq)
            self.created += 1
            return None
        job = self.load(job_id)
        if job is None:
            raise StoreError(f"seq {seq}: the log has events of job {job_id} before its "
                             "JobCreated")
        state = self.jobs[job_id] = state_of(job)
        return state

    def take_finished(self) -> list[State]:
        """Remove and return the finished jobs, in the order they were created or revived."""
        finished: list[State] = []
        active: dict[str, State] = {}
        for job_id, state in self.jobs.items():
            if state[STATUS] in ACTIVE:
                active[job_id] = state
            else:
                finished.append(state)
        self.jobs = active
        return finished

    def take_all(self) -> list[State]:
        """Remove and return every job still held."""
        held = list(self.jobs.values())
        self.jobs = {}
        return held


def _inconsistent(job_id: str, event: Any, seq: int, version: int,
                  state: State | None) -> StoreError:
    if state is not None and event.__class__ is JobCreated:
        return StoreError(f"seq {seq}: a second JobCreated for job {job_id}")
    if event.__class__ not in _STEPS and event.__class__ is not JobCreated:
        return StoreError(f"seq {seq}: {type(event).__name__} is not known to the rebuild")
    return StoreError(f"seq {seq}: {type(event).__name__} of job {job_id} is stored as "
                      f"version {version}, but the job is at version "
                      f"{0 if state is None else state[VERSION]}")


def _body(state: State) -> bytes:
    body = _Body(*state)
    current = state[CURRENT]
    if current.__class__ is not str:
        body.current_path = (  # type: ignore[attr-defined]
            layout.processing_path(body) if current is _PROCESSING  # type: ignore[arg-type]
            else layout.error_path(body) if current is _ERROR  # type: ignore[arg-type]
            else layout.archive_path(body, current))  # type: ignore[arg-type]
    return _encode(body)


def pack(states: Iterable[State]) -> tuple[bytes, bytes]:
    """Rows as (heads, bodies): a JSON array of the other columns, then each body's offset
    (from 1) and length in `bodies`, all the `body` texts end to end as UTF-8."""
    heads: list[tuple[Any, ...]] = []
    bodies: list[bytes] = []
    offset = 1
    for state in states:
        body = _body(state)
        size = len(body)
        heads.append((
            state[ID], state[WORKFLOW], state[FILE], state[STATUS], state[CHANNEL],
            state[PRIORITY], state[KEY], micros(state[CREATED_AT]), micros(state[UPDATED_AT]),
            state[CREATED_SEQ], state[SEQ], state[VERSION], offset, size))
        bodies.append(body)
        offset += size
    return _encode(heads), b"".join(bodies)


def unpack(heads: bytes, bodies: bytes) -> list[Row]:
    """The rows of `pack`, as sqlite3 parameters in JOB_COLUMNS order."""
    return [(*head[:12], bodies[head[12] - 1:head[12] - 1 + head[13]].decode())
            for head in _heads_decoder.decode(heads)]
