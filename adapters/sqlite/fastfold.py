"""A second fold of the log, for `multiflow rebuild` only: job states, fast.

Why a second fold exists: the kernel's `fold_stored` makes a new frozen `Job` per event
(`msgspec.structs.replace` of every field, the file path recomputed at every claim), and
with `job_row` per row that was ~10x the cost of decoding a log of a million events.
Here a job is a plain list in `Job`'s field order: an event sets only the slots it
changes; the file path and the row are made once per job (adapters/sqlite/foldrows.py).

It must give exactly `job_row` of the kernel's fold, byte for byte: tests/property/
test_rebuild_fold.py rebuilds generated logs (every event type with every field varied,
retries, cancels, duplicates, revived jobs, refusals at intake) and the simulation's logs
and compares the rows with the kernel's, so a change to `kernel.state` that this module
misses fails that test. Events are decoded with the kernel's own decoder: a payload the
kernel refuses is refused here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

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
Stored = tuple[int, int, "str | bytes"]  # seq, version, payload

FIELDS = msgspec.structs.fields(Job)
_NAMES = tuple(field.name for field in FIELDS)
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
# current_path is made when the row is built (foldrows.py); until then the slot may hold a
# marker: the processing or error folder, or the completion's time (its day's archive).
PROCESSING, ERROR_FOLDER = 1, 2


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return None if field.required else field.default


DEFAULTS = [_default(field) for field in FIELDS]
# Mutable defaults are made anew for each job, as Job's default factories do.
_FACTORIES = tuple((index, field.default_factory) for index, field in enumerate(FIELDS)
                   if field.default_factory is not msgspec.NODEFAULT and index != PARAMS)


def created_state(event: JobCreated, seq: int) -> State:
    """A new job's state: `evolve(None, JobCreated)` stamped with its seq."""
    state = DEFAULTS.copy()
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
    state[CURRENT] = PROCESSING


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
        state[CURRENT] = ERROR_FOLDER
    else:  # the file waits in processing/ where the failed attempt left it
        state[STATUS] = _PENDING
        state[RETRY_AT] = event.retry_at


def _completed(state: State, event: JobCompleted) -> None:
    state[STATUS] = _COMPLETED
    state[PROGRESS] = 1.0
    state[RESULT] = event.result
    state[OUTPUTS] = tuple(event.output_paths)
    state[FINISHED_AT] = event.at
    state[ERROR] = None
    state[CURRENT] = event.at


def _cancelled(state: State, event: JobCancelled) -> None:
    state[STATUS] = _CANCELLED
    state[FINISHED_AT] = event.at
    state[RETRY_AT] = None
    state[ERROR] = ErrorInfo(type="Cancelled", message=event.reason, actor=event.actor)
    state[CURRENT] = ERROR_FOLDER


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
    """Folds stored events (seq, version, payload) in seq order into job states.

    A job is keyed by its events' `job_id`, which the store checks against the row's.
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
        for seq, version, payload in stored:
            event = decode(payload)
            state = jobs.get(event.job_id)
            if state is None:
                if event.__class__ is JobCreated and version == 1:
                    jobs[event.job_id] = created_state(event, seq)
                    self.created += 1
                    continue
                state = self._revived(event, seq, version)
            step = steps.get(event.__class__)
            if step is None or state[VERSION] + 1 != version:
                raise _inconsistent(event, seq, version, state)
            step(state, event)
            state[UPDATED_AT] = event.at
            state[VERSION] = version
            state[SEQ] = seq

    def _revived(self, event: Any, seq: int, version: int) -> State:
        # One more event of a job handed out finished: go on from its row.
        job = None if event.__class__ is JobCreated else self.load(event.job_id)
        if job is None:
            raise _inconsistent(event, seq, version, None)
        state = self.jobs[event.job_id] = state_of(job)
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


class Irregular(Exception):
    """The log is not one the job-order fold may take: the fold in seq order must decide."""


ByJob = tuple[int, int, "str | bytes"]  # version, seq, payload


class JobOrder:
    """Folds events given job by job, of the jobs with first <= job_id < end (None: no bound).

    Read ORDER BY job_id, version, all of a job's events come together, so a job is done
    when the next one begins: only the current job is held, none is ever revived. That
    gives the seq-order fold's rows where each job's events are in order by both version
    and seq, begin with its JobCreated as version 1, and where every job is in its range
    and after the one before (so no job comes twice). Anything else raises Irregular: the
    caller then folds in seq order, which raises the StoreError naming the first bad seq.
    """

    def __init__(self, first: str | None, end: str | None) -> None:
        self.first, self.end = first, end
        self.held: State | None = None  # the current job, finished when the next begins
        self.events = 0
        self.jobs = 0

    def fold(self, stored: Iterable[ByJob], finished: list[State]) -> None:
        """Apply a chunk of events; jobs finished by it are appended to `finished`."""
        steps, decode, created = _STEPS, decode_event, created_state
        state, jobs, count = self.held, self.jobs, 0
        last = self.first if state is None else state[ID]
        for version, seq, payload in stored:
            count += 1
            event = decode(payload)
            if version == 1:
                job_id = event.job_id
                if (event.__class__ is not JobCreated or (last is not None and job_id <= last
                        and not (state is None and job_id == last))
                        or (self.end is not None and job_id >= self.end)):
                    raise Irregular(f"seq {seq}: JobCreated of job {job_id} out of order")
                if state is not None:
                    finished.append(state)
                state = created(event, seq)
                last = job_id
                jobs += 1
                continue
            step = steps.get(event.__class__)
            if (state is None or step is None or version != state[VERSION] + 1
                    or seq <= state[SEQ] or event.job_id != state[ID]):
                raise Irregular(f"seq {seq}: event of job {event.job_id} out of order")
            step(state, event)
            state[UPDATED_AT] = event.at
            state[VERSION] = version
            state[SEQ] = seq
        self.held, self.jobs = state, jobs
        self.events += count

    def finish(self, finished: list[State]) -> None:
        """The last job is finished too."""
        if self.held is not None:
            finished.append(self.held)
            self.held = None


def _inconsistent(event: Any, seq: int, version: int, state: State | None) -> StoreError:
    what, job_id = type(event).__name__, event.job_id
    if event.__class__ is JobCreated:
        return StoreError(f"seq {seq}: JobCreated of job {job_id} stored as version {version}")
    if state is None:
        return StoreError(f"seq {seq}: the log has events of job {job_id} before its JobCreated")
    if event.__class__ not in _STEPS:
        return StoreError(f"seq {seq}: {what} is not known to the rebuild")
    return StoreError(f"seq {seq}: {what} of job {job_id} is stored as version {version}, "
                      f"but the job is at version {state[VERSION]}")
