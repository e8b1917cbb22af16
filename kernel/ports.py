"""What the shell must provide to the kernel: Protocols, behaviour in the docstrings.

Adapters fit these structurally and translate their driver's errors into the
errors below, so the kernel never sees sqlite3 or psycopg exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from kernel.chain import ChainRow
from kernel.config import WorkflowConfig
from kernel.events import Event
from kernel.state import Job, Status, StoredEvent

if TYPE_CHECKING:
    from kernel.task import BaseProcessor, BaseTask, JobContext


# -- errors every store raises -------------------------------------------------------


class StoreError(Exception):
    """The event store could not do what was asked; nothing was written."""


class ConcurrencyConflict(StoreError):
    """The job moved on: its version is not the one the append expected."""

    def __init__(self, job_id: str, expected: int, actual: int) -> None:
        super().__init__(f"job {job_id} is at version {actual}, append expected {expected}")
        self.job_id, self.expected, self.actual = job_id, expected, actual


class DuplicateJob(StoreError):
    """A JobCreated for a file that already has an active job, or a reused idempotency key."""

    def __init__(self, existing_job_id: str, reason: str) -> None:
        super().__init__(f"{reason}: job {existing_job_id}")
        self.existing_job_id, self.reason = existing_job_id, reason


class StoreFull(StoreError):
    """The disk under the store is full; the append was rolled back whole."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (closed, connection lost); retry later."""


class StoreLocked(StoreError):
    """Another process holds the store for writing (a running server)."""


# -- read-model queries ------------------------------------------------------------


class JobQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Filters of a job listing; `cursor` is the opaque `next_cursor` of the previous page."""

    workflow_name: str | None = None
    status: Status | None = None
    channel_name: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 100
    cursor: str | None = None


class JobPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of jobs, newest first; `next_cursor` is None on the last page."""

    items: list[Job]
    next_cursor: str | None = None


class Append(msgspec.Struct, frozen=True):
    """One job's events to append at the version the caller saw.

    `if_all_before`: stored only if every append before it in its batch that is not so
    marked was stored, else refused with NotClaimed. A finishing job's outcome and the
    next job's claim share a commit: the claim must not start (and the log show two
    jobs running under a limit of one) while the outcome is refused.
    """

    job_id: str
    events: Sequence[Event]
    expected_version: int
    if_all_before: bool = False


class EventStore(Protocol):
    """The append-only job log with its status read model.

    `append` is atomic: all of its events and the job's new read-model row are
    durable together, or nothing is. Appends that arrive together may share one
    transaction (group commit), but each succeeds or fails on its own. Events get a
    gapless global `seq` (readers never see seq N+1 before N) and a per-job
    `version` starting at 1; each carries `hash`, the chain link of `kernel.chain`.
    """

    async def append(
        self, job_id: str, events: Sequence[Event], expected_version: int
    ) -> list[StoredEvent]:
        """Append events to a job at `expected_version` (0 for a new job).

        Raises ConcurrencyConflict when the job is at another version, DuplicateJob when a
        JobCreated names a (workflow, file_path) that has an active job or a reused
        (workflow, idempotency_key), StoreFull when the disk is full.
        """
        ...

    async def append_batch(
        self, appends: Sequence[Append]
    ) -> list[list[StoredEvent] | StoreError]:
        """Several appends in one transaction; each succeeds or fails on its own.

        Returns, in order, each append's stored events or the error that refused it.
        This is how a job's JobCompleted and the next job's JobStarted share a commit.
        """
        ...

    async def read_job(self, job_id: str) -> list[StoredEvent]:
        """Every event of one job, in version order ([] for an unknown job)."""
        ...

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events with seq > `after`, in seq order."""
        ...

    async def read_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        """Up to `limit` rows after `after` as the hash chain needs them: payloads as stored."""
        ...

    def tail(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event with seq > `after`, then each new one as it is committed; never ends."""
        ...

    async def last_seq(self) -> int:
        """The seq of the newest committed event (0 for an empty log)."""
        ...

    async def get_job(self, job_id: str) -> Job | None:
        """The read-model row of one job."""
        ...

    async def find_active(self, workflow_name: str, file_path: str) -> Job | None:
        """The active job that owns a file, if any."""
        ...

    async def find_by_key(self, workflow_name: str, idempotency_key: str) -> Job | None:
        """The job created with this idempotency key, whatever its status."""
        ...

    async def latest_jobs(self, workflow_name: str, file_paths: Sequence[str]) -> dict[str, Job]:
        """For each of these files that ever had a job, its most recent job (any status)."""
        ...

    async def active_jobs(self, workflow_name: str | None = None) -> list[Job]:
        """Every pending or running job (of one workflow), oldest first."""
        ...

    async def list_jobs(self, query: JobQuery) -> JobPage:
        """A page of the read model, newest first."""
        ...

    async def count_jobs(self) -> dict[tuple[str, str], int]:
        """How many jobs per (workflow, status)."""
        ...

    async def close(self) -> None:
        """Flush pending appends and release the store."""
        ...


# -- several nodes on one store ------------------------------------------------------


class NotClaimed(StoreError):
    """A claim was not taken: a cluster-wide limit was reached, the node's free slots
    were filled by earlier candidates of the same claim, or the append it was made
    beside was refused (`Append.if_all_before`). Nothing was written."""


class NotAfter(NotClaimed):
    """A claim not taken because the append it was made beside was refused
    (`Append.if_all_before`): no limit was reached."""


class ClaimLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What a shared store enforces, under its append lock, when it takes claims.

    `slots` caps how many of the candidates start (the node's free slots); `running`
    caps the jobs running in the whole cluster (None: no cluster-wide limit);
    `per_workflow` caps each named workflow's running jobs in the whole cluster.
    """

    slots: int
    running: int | None = None
    per_workflow: dict[str, int] = msgspec.field(default_factory=dict)


@runtime_checkable
class Cluster(Protocol):
    """A store that several nodes share (PostgreSQL): claims, liveness and leases.

    Liveness is per node, not per job: a node renews its lease with `heartbeat`, and
    every job it claimed (JobStarted.worker = `node_id`) is alive while that lease is.
    Time is the database's, so the nodes' clocks need not agree.
    """

    node_id: str

    async def append_claims(
        self, appends: Sequence[Append], candidates: Sequence[Append], limits: ClaimLimits
    ) -> tuple[list[list[StoredEvent] | StoreError], list[list[StoredEvent] | StoreError]]:
        """Append `appends` like `append_batch`, then take candidates (JobStarted appends, in
        the order given) while `limits` allow, all in one transaction. A candidate that is
        not taken gets NotClaimed (a limit) or ConcurrencyConflict (claimed or changed
        elsewhere)."""
        ...

    async def heartbeat(self, lease_s: float) -> bool:
        """Renew this node's lease for `lease_s` seconds; False if it had already expired
        (other nodes may have recovered this node's jobs)."""
        ...

    async def live_nodes(self) -> set[str]:
        """The nodes whose leases have not expired."""
        ...

    async def running_jobs(self) -> list[Job]:
        """Every running job of the cluster (few: at most the concurrency limits)."""
        ...

    async def leave(self) -> None:
        """End this node's lease now (a clean shutdown)."""
        ...

    async def dead_nodes(self) -> list[str]:
        """Nodes whose leases expired and that no node has cleaned up after yet."""
        ...

    async def finished_by(self, node_id: str) -> list[Job]:
        """Jobs that ended while `node_id` held them (completed, failed or cancelled in its
        last lease): their files may still wait in processing/ if it died before moving
        them."""
        ...

    async def forget_node(self, node_id: str) -> None:
        """Drop a dead node once its jobs and files are recovered."""
        ...

    async def hold_lease(self, name: str, lease_s: float) -> bool:
        """Take or renew the cluster-wide lease `name` (e.g. "notifications") for this node;
        True while this node holds it."""
        ...

    async def release_lease(self, name: str) -> None:
        """Give the lease `name` up, if this node holds it."""
        ...

    def tail_others(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event after `after` appended by other nodes, as they are committed."""
        ...


# -- the world around a job ----------------------------------------------------------


class JobLookup(Protocol):
    """The read-model lookups reconciliation needs (an EventStore provides them)."""

    async def get_job(self, job_id: str) -> Job | None:
        """The read-model row of one job."""
        ...

    async def latest_jobs(self, workflow_name: str, file_paths: Sequence[str]) -> dict[str, Job]:
        """For each of these files that ever had a job, its most recent job."""
        ...


class Clock(Protocol):
    """Wall time as data, so tests and replays are deterministic."""

    def now(self) -> datetime:
        """The current UTC time (timezone-aware)."""
        ...


class Entropy(Protocol):
    """Ids and random samples, made by the shell."""

    def new_id(self) -> str:
        """A new job id: unique, and sortable by creation time."""
        ...

    def random(self) -> float:
        """A sample in [0, 1), for retry jitter."""
        ...


class Refusal(msgspec.Struct, frozen=True):
    """Why intake refused a file: TooLarge, TypeNotAllowed, Truncated, Infected, ..."""

    error_type: str
    message: str


class ScannerUnavailable(Exception):
    """The virus scanner cannot be reached: the job must wait, never pass as clean."""


class FileMissing(Exception):
    """The job's file is nowhere the lifecycle could have left it."""


class FileChanged(Exception):
    """The file in input/ is not the one intake accepted: replaced, or written to, since."""


ProgressSink = Callable[[float, str], None]


class Files(Protocol):
    """The hot folders: moves that follow durable events, and the processor's workspace."""

    async def intake(
        self, job: Job, config: WorkflowConfig, processor: BaseProcessor
    ) -> Refusal | None:
        """Run the intake checks on a pending job's file; raise ScannerUnavailable to wait."""
        ...

    async def claim(self, job: Job) -> None:
        """Move the file of a just-started job to its `current_path` in processing/.

        Idempotent; the file may be in input/, processing/ or error/ (an operator retry).
        Raises FileMissing when it is nowhere, FileChanged when the file in input/ is
        not the one intake accepted (its bytes never went through the checks).
        """
        ...

    async def settle(self, job: Job) -> None:
        """Move a terminal job's file to its `current_path` (archive/ or error/); idempotent.

        For a failed or cancelled job, also writes `{file}.error.json` beside it.
        """
        ...

    async def reconcile(self, workflow_name: str, active: Sequence[Job], jobs: JobLookup) -> None:
        """At registration: sweep temporaries; settle or return files no active job owns.

        `jobs` reads the log's read model, so a file whose job already finished (a crash
        between its terminal event and the move) is settled, never processed again: in
        processing/ by the job id in its name, in input/ by its latest job.
        """
        ...

    def context(
        self,
        job: Job,
        config: WorkflowConfig,
        progress: ProgressSink,
        cancelled: Callable[[], bool],
    ) -> JobContext:
        """The processor's view of its job: input path, output writer, progress, logger."""
        ...


class Executor(Protocol):
    """Runs a processor: on the event loop, in a worker thread or in a worker process."""

    async def run(
        self, processor: BaseProcessor, ctx: JobContext, task: BaseTask, runner: str
    ) -> dict[str, Any]:
        """Call `processor.process(ctx, task)` as its runner says; return its result dict.

        Cancellation (a timeout, a cancel request) must stop the wait at once: a worker
        thread is abandoned after `ctx.cancelled` turns true, a worker process is killed.
        """
        ...

    async def cleanup(self, processor: BaseProcessor, ctx: JobContext) -> None:
        """Call `processor.cleanup(ctx)` off the event loop, time-boxed."""
        ...
