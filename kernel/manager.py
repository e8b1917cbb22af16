"""The JobManager: drives commands through the ports, one central queue for every workflow.

A job's way through the manager: `submit` appends JobCreated (answered once it is
durable) -> intake checks -> the queue -> a claim (JobStarted appended at the
version the manager saw: the claim) -> the file moves to processing/ -> the
processor runs -> JobCompleted or JobFailed -> the file moves to archive/ or
error/. When an attempt ends, the next claim rides in the same append batch as
its terminal event, so at concurrency 1 each job costs one durable commit.

On a store that several nodes share (a `Cluster`, decision 0004) the manager also
keeps its node's lease alive, follows the other nodes' events (new jobs enter
its queue; a job cancelled elsewhere stops here), offers spare candidates with
each claim so that nodes racing for the same queue head do not come away empty,
lets the store enforce the cluster-wide limits under its append lock, and fails
as Interrupted the running jobs of nodes whose leases expired.

The duties beside the loop live in their own modules, as mixins: intake, recovery
and progress in kernel/intake.py, the cluster's in kernel/nodes.py (their shared
view of the manager is `kernel.host.ManagerHost`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import msgspec

from kernel.attempt import Attempt, Outcome, run_attempt
from kernel.config import WorkflowConfig, retry_at
from kernel.decide import (
    AnyCommand,
    CancelJob,
    CreateJob,
    FailJob,
    RecordDuplicate,
    Rejected,
    ReportProgress,
    RetryJob,
    StartJob,
    decide,
)
from kernel.events import Event
from kernel.host import STORE_RETRY_MAX_S, Submitted, Workflow
from kernel.intake import IntakeDuties
from kernel.layout import check_workflow_name
from kernel.nodes import ClusterDuties
from kernel.ports import (
    Append,
    ClaimLimits,
    Clock,
    Cluster,
    ConcurrencyConflict,
    DuplicateJob,
    Entropy,
    EventStore,
    Executor,
    FileChanged,
    FileMissing,
    Files,
    NotAfter,
    NotClaimed,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from kernel.queue import JobQueue
from kernel.state import Job, Status, StoredEvent, apply, evolve
from kernel.task import BaseProcessor

CONFLICT_RETRIES_MAX = 5
SPARE_CANDIDATES = 4  # offered beyond the free slots in a cluster, should others be faster

__all__ = ["JobManager", "Submitted", "Workflow"]


class JobManager(IntakeDuties, ClusterDuties):
    """The central job queue and the loop that runs it (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        files: Files,
        executor: Executor,
        *,
        clock: Clock,
        entropy: Entropy,
        concurrency: int = 1,
        aging_interval_s: float | None = 60.0,
        worker_name: str = "",
        intake_concurrency: int = 32,
        cluster: Cluster | None = None,
        cluster_concurrency: int | None = 1,
        lease_s: float = 15.0,
        heartbeat_s: float = 3.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if cluster_concurrency is not None and cluster_concurrency < 1:
            raise ValueError("cluster_concurrency must be at least 1 (or None: no limit)")
        if not 0 < heartbeat_s < lease_s:
            raise ValueError("heartbeat_s must be positive and shorter than lease_s")
        self.store, self.files, self.executor = store, files, executor
        self.clock, self.entropy = clock, entropy
        self.concurrency = concurrency
        self.worker_name = worker_name
        self.intake_concurrency = intake_concurrency
        self.workflows: dict[str, Workflow] = {}
        self.queue = JobQueue(aging_interval_s)
        self._jobs: dict[str, Job] = {}  # active jobs this manager knows
        self._running: dict[str, Attempt] = {}
        self._running_by_workflow: dict[str, int] = {}
        # On one node, attempts whose slot was released but whose outcome is not recorded
        # yet: their slots stay taken for every claim but the ones made beside that outcome
        # (which start only if it is recorded), so the log never shows more running than
        # allowed. (In a cluster the store checks the limits against the log itself.)
        self._finishing: dict[str, str] = {}  # job id -> workflow
        self._finishing_by_workflow: dict[str, int] = {}
        self._intake: deque[str] = deque()
        self._intake_ready = anyio.Event()
        # Claims whose store call failed, which may have committed all the same: job id ->
        # the version the claim was made at (kernel/nodes.py, `_recover_orphans`).
        self._unsure_claims: dict[str, int] = {}
        self._wakeup = anyio.Event()
        self._waiters: dict[str, anyio.Event] = {}
        self._unsettled: set[str] = set()  # terminal, but the file is still on its way
        self._all_settled = anyio.Event()
        self._blocked_until: dict[str, float] = {}
        self._claiming = True
        self._tg: anyio.abc.TaskGroup | None = None
        self._idle = anyio.Event()
        # Several nodes: the shared store, the cluster-wide limit, this node's lease.
        self.cluster = cluster
        self.cluster_concurrency = cluster_concurrency
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        if cluster is not None:
            self.worker_name = cluster.node_id
        self._lease_ok = True
        self._lease_renewed = anyio.Event()  # set while the lease is renewed in time
        self._lease_renewed.set()
        self._cluster_full_until = 0.0  # a cluster-wide limit was reached: wait for a finish
        self._candidates = 0  # reserved in _running by claims in flight (in a cluster)
        self._offered = 0  # the slots those claims offer
        self._peers = 0  # other live nodes, as of the last heartbeat: spares only then

    # -- public API ------------------------------------------------------------------

    async def register_workflow(
        self,
        name: str,
        processor: BaseProcessor,
        *,
        config: WorkflowConfig | None = None,
        watcher: Any = None,
    ) -> Workflow:
        """Register a workflow; its jobs left running by a dead process are recovered now."""
        workflow = self.add_workflow(name, processor, config=config, watcher=watcher)
        await self.recover(workflow)
        return workflow

    def add_workflow(
        self,
        name: str,
        processor: BaseProcessor,
        *,
        config: WorkflowConfig | None = None,
        watcher: Any = None,
    ) -> Workflow:
        """Validate and record a workflow; `recover` must follow before its jobs run."""
        problem = check_workflow_name(name)
        if problem:
            raise ValueError(f"invalid workflow name {name!r}: {problem}")
        if name in self.workflows:
            raise ValueError(f"workflow {name!r} is already registered")
        if not isinstance(processor, BaseProcessor):
            raise TypeError(f"the processor of {name!r} must inherit BaseProcessor")
        workflow = Workflow(name=name, processor=processor,
                            config=config or WorkflowConfig(), watcher=watcher)
        self.workflows[name] = workflow
        return workflow

    async def submit(
        self,
        workflow_name: str,
        file_path: str,
        *,
        priority: int = 0,
        channel_name: str | None = None,
        params: dict[str, Any] | None = None,
        completeness: str = "submitted",
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Create a job (durable when this returns), or return the file's active job."""
        workflow = self._workflow(workflow_name)
        try:
            task = workflow.processor.parse_task(params or {})
        except msgspec.ValidationError as exc:
            raise Rejected("invalid", f"invalid params: {exc}") from None
        command = CreateJob(
            job_id=self.entropy.new_id(), at=self.clock.now(), workflow_name=workflow_name,
            file_path=file_path, channel_name=channel_name, priority=priority,
            params=msgspec.to_builtins(task), completeness=completeness,
            idempotency_key=idempotency_key,
        )
        events = decide(None, command)
        try:
            stored = await self.store.append(command.job_id, events, 0)
        except anyio.get_cancelled_exc_class():
            # The caller gave up (a timeout around submit) while the append was in the
            # group commit, which writes it all the same: queue the job if it landed.
            if self._tg is not None:
                self._tg.start_soon(self._adopt, command.job_id, events)
            raise
        except DuplicateJob as dup:
            existing = await self.store.get_job(dup.existing_job_id)
            if existing is None:
                raise
            if existing.status is Status.PENDING and existing.id not in self._jobs:
                # Not followed here: made by an earlier submit whose commit landed though
                # the store reported it failed (its reply lost with the connection), or by
                # another node just now. Queue it, or it would wait for nothing.
                self._jobs[existing.id] = existing
                self._admit(existing)
            return Submitted(existing, False)
        job = self._apply(None, stored)
        self._admit(job)
        return Submitted(job, True)

    async def _adopt(self, job_id: str, events: list[Event]) -> None:
        """Queue the job of a submit cancelled while its append was being written. The
        same append again is ordered after it: refused if it landed, made if it did not
        (its caller gave up on it, but the file in input/ is still there to run)."""
        try:
            with contextlib.suppress(DuplicateJob, ConcurrencyConflict):
                await self.store.append(job_id, events, 0)
            job = await self.store.get_job(job_id)
        except StoreError:
            return  # the watcher's next scan (or the next start) queues it
        if job is not None and job.status is Status.PENDING and job_id not in self._jobs:
            self._jobs[job_id] = job
            self._admit(job)

    def recheck(self, job_id: str) -> None:
        """The file of a pending job was replaced (dropped again under its name): take the
        job out of the queue and through the intake checks again, for the new bytes."""
        job = self._jobs.get(job_id)
        if job is None or job.status is not Status.PENDING or job.attempts or \
                job_id in self._running:
            return
        self.queue.discard(job_id)
        if job_id not in self._intake:
            self._admit(job)

    async def cancel(self, job_id: str, *, actor: str, reason: str = "") -> Job:
        """Cancel a pending or running job; a running processor is stopped."""
        with anyio.CancelScope(shield=True):  # once appended, the rest must follow
            job = await self._cancel(job_id, actor=actor, reason=reason)
        return job

    async def _cancel(self, job_id: str, *, actor: str, reason: str) -> Job:
        before: list[Job] = []

        def command(job: Job) -> CancelJob:
            before[:] = [job]
            return CancelJob(job_id=job_id, at=self.clock.now(), actor=actor, reason=reason)

        job = await self._decide_and_append(job_id, command)
        self.queue.discard(job_id)
        attempt = self._running.get(job_id)
        if attempt is not None and attempt.job.status is Status.RUNNING:
            attempt.stop("cancel")  # its runner settles the file once the processor stops
        elif attempt is not None:
            # Being claimed here: that claim now conflicts. We cancelled it, so we move
            # its file (on one node the claim may have moved it already: settle finds it).
            attempt.stop("cancel")
            await self._settle_file(job)
        elif self.cluster is not None and before[0].status is Status.RUNNING:
            # Another node runs it: that node stops the processor and moves the file.
            self._done_here(job.id)
        else:
            await self._settle_file(job)
        return job

    async def retry(self, job_id: str, *, actor: str, reason: str = "") -> Job:
        """Send a finally failed or cancelled job back to the queue (one more attempt)."""
        with anyio.CancelScope(shield=True):  # once appended, it must be queued
            job = await self._decide_and_append(job_id, lambda job: RetryJob(
                job_id=job_id, at=self.clock.now(), actor=actor, reason=reason))
            self._admit(job)
        return job

    async def record_duplicate(self, job_id: str, *, file_path: str, stored_path: str,
                               sha256: str = "") -> Job:
        """Record against `job_id` that an identical file was dropped again (not processed)."""
        return await self._decide_and_append(job_id, lambda job: RecordDuplicate(
            job_id=job_id, at=self.clock.now(), file_path=file_path, stored_path=stored_path,
            sha256=sha256))

    async def get_job(self, job_id: str) -> Job | None:
        """The job as this manager or the store knows it."""
        return self._jobs.get(job_id) or await self.store.get_job(job_id)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Wait until a job is completed, failed or cancelled; TimeoutError after `timeout_s`."""
        with anyio.fail_after(timeout_s):
            while True:
                job = await self._finished(job_id)
                if job is not None:
                    return job
                event = self._waiters.setdefault(job_id, anyio.Event())
                job = await self._finished(job_id)  # it may have finished meanwhile
                if job is not None:
                    return job
                with anyio.move_on_after(1.0):  # also sees jobs finished by other nodes
                    await event.wait()

    async def _finished(self, job_id: str) -> Job | None:
        job = await self.get_job(job_id)
        if job is None:
            raise Rejected("not_found", f"job {job_id} does not exist")
        return job if not job.is_active and job.id not in self._unsettled else None

    def running_jobs(self) -> list[Job]:
        """The jobs whose processors run now."""
        return [attempt.job for attempt in self._running.values()]

    @property
    def claiming(self) -> bool:
        """False once shutdown began: no new job starts."""
        return self._claiming

    # -- the loop --------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the scheduler, intake and progress tasks until cancelled."""
        after = 0
        if self.cluster is not None:
            # The lease exists before the first claim: a claim by a node without one
            # would look abandoned to the other nodes.
            after = await self.store.last_seq()
            await self.cluster.heartbeat(self.lease_s)
            self._peers = len(await self.cluster.live_nodes() - {self.cluster.node_id})
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.cluster is not None:
                tg.start_soon(self._keep_alive, self.cluster)
                tg.start_soon(self._follow, self.cluster, after)
            for _ in range(self.intake_concurrency):
                tg.start_soon(self._intake_worker)
            tg.start_soon(self._flush_progress)
            tg.start_soon(self._schedule)
            task_status.started()

    async def drain(self, grace_s: float) -> None:
        """Stop claiming; let running jobs finish for `grace_s`, then record them interrupted."""
        self._claiming = False
        self._wake()
        with anyio.move_on_after(grace_s):
            while self._running:
                self._idle = anyio.Event()
                await self._idle.wait()
        for attempt in list(self._running.values()):
            attempt.stop("shutdown")
        with anyio.move_on_after(10.0):
            while self._running:
                self._idle = anyio.Event()
                await self._idle.wait()
        with anyio.move_on_after(5.0):
            while self._unsettled:  # files on their way to archive/ or error/
                self._all_settled = anyio.Event()
                await self._all_settled.wait()

    async def _schedule(self) -> None:
        while True:
            claims, slots = self._pick_claims()
            if claims:
                await self._commit([], claims, slots)
                continue
            self._wakeup = anyio.Event()
            with anyio.move_on_after(self._idle_wait_s()):
                await self._wakeup.wait()

    def _idle_wait_s(self) -> float:
        wait_s = 1.0
        # A retry falling due matters only when a slot is free to start it (else: spinning).
        busy = len(self._running) + len(self._finishing)
        due = self.queue.next_due() if busy < self.concurrency else None
        if due is not None:
            wait_s = min(wait_s, max(0.0, (due - self.clock.now()).total_seconds()))
        now_s = anyio.current_time()
        for name in [n for n, until in self._blocked_until.items() if until <= now_s]:
            del self._blocked_until[name]  # expired: the workflow may start jobs again
        if self._blocked_until:
            wait_s = min(wait_s, min(self._blocked_until.values()) - now_s)
        return wait_s

    def _pick_claims(self, handover: Job | None = None) -> tuple[list[Job], int]:
        """The jobs to claim next, and how many of them may start (the free slots).

        On one node these are the same. In a cluster, spare candidates follow when other
        nodes are alive (they may take the first ones meanwhile); the slots offered by
        claims in flight count as taken, so that claims made together never offer more
        than this node's free slots. A finishing attempt's slot is free only to the claims
        made beside its outcome (`handover`, the job finishing).
        """
        claims: list[Job] = []
        if not self._claiming or not self._lease_ok or \
                self._cluster_full_until > anyio.current_time():
            return claims, 0
        finishing = len(self._finishing) - (handover is not None and handover.id in self._finishing)
        busy = len(self._running) - self._candidates + self._offered + finishing
        free = self.concurrency - busy
        if free <= 0:
            return claims, 0
        spares = SPARE_CANDIDATES if self.cluster is not None and self._peers else 0
        now = self.clock.now()
        handed = handover.workflow_name if handover is not None else None
        while len(claims) < free + spares:
            job = self.queue.pick(now, lambda job: self._can_start(job, handed))
            if job is None:
                break
            self._reserve(job)
            claims.append(job)
        slots = min(free, len(claims))
        if self.cluster is not None:
            self._candidates += len(claims)
            self._offered += slots
        return claims, slots

    def _can_start(self, job: Job, handed: str | None = None) -> bool:
        """Whether `job` may start now; `handed`: the workflow of a finishing attempt whose
        slot the claim is made beside (its own, to take)."""
        if job.id in self._running:
            return False  # its previous attempt is still winding down
        workflow = self.workflows.get(job.workflow_name)
        if workflow is None or not workflow.config.enabled:
            return False
        blocked_until = self._blocked_until.get(job.workflow_name)
        if blocked_until is not None:
            if blocked_until > anyio.current_time():
                return False
            del self._blocked_until[job.workflow_name]
        limit = workflow.config.concurrency
        if limit is not None and self.cluster is not None:
            return True  # candidates beyond it are refused by the store (cluster-wide)
        if limit is None:
            return True
        name = job.workflow_name
        finishing = self._finishing_by_workflow.get(name, 0) - (handed == name)
        return self._running_by_workflow.get(name, 0) + finishing < limit

    def _reserve(self, job: Job) -> None:
        self._running[job.id] = Attempt(job)
        self._running_by_workflow[job.workflow_name] = (
            self._running_by_workflow.get(job.workflow_name, 0) + 1)

    def _release(self, job: Job) -> None:
        if self._running.pop(job.id, None) is not None:
            self._running_by_workflow[job.workflow_name] -= 1
            if job.status is Status.RUNNING:
                self._cluster_full_until = 0.0  # a slot of the cluster's is free again
        if not self._running:
            self._idle.set()
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    # -- commits: a finished attempt's events and the next claims, in one batch ------

    async def _commit(self, first: list[tuple[Job, list[Event]]], claims: list[Job],
                      slots: int = 0) -> list[list[StoredEvent] | StoreError]:
        """Append `first` and the claims of `claims` (at most `slots` of them start)
        together; start each claimed job."""
        at = self.clock.now()
        picked = len(claims)
        moving: list[Job] = []
        appends = [Append(job.id, events, job.version) for job, events in first]
        startable: list[Job] = []
        for job in claims:
            try:
                started = decide(job, StartJob(job_id=job.id, at=at, worker=self.worker_name))
            except Rejected:  # the clock stepped back before its retry time: later
                self._release(job)
                self.queue.push(job)
                if self.cluster is not None:  # no longer a candidate of this claim
                    self._candidates -= 1
                    picked -= 1
                continue
            # A claim beside an outcome starts only if the outcome is recorded: refused
            # (a conflict), it is retried with the slot still taken in the log.
            appends.append(Append(job.id, started, job.version, if_all_before=bool(first)))
            startable.append(job)
            if self.cluster is None:
                moving.append(evolve(job, started[0]))
        claims = startable
        try:
            if self.cluster is not None and claims:
                firsts, taken = await self.cluster.append_claims(
                    appends[: len(first)], appends[len(first):], self._limits(slots))
                results = firsts + taken
            else:
                # One node: the claimed files move while their claims commit, so the
                # fsync of processing/ runs beside the log's instead of after it
                # (decision 0005). Nothing waits for these moves here: the attempt's
                # own claim waits for its file's move to be durable before the processor
                # runs. A claim that fails leaves its pending job's file in processing/,
                # where every lookup of a pending job's file searches.
                for running in moving:
                    self._tg_start(self._move_early, running)
                results = await self.store.append_batch(appends)
        except StoreError as exc:
            results = [exc] * len(appends)
        finally:
            if self.cluster is not None:
                self._candidates -= picked
                self._offered -= slots
        outcomes = results[len(first):]
        for job, result in zip(claims, outcomes, strict=True):
            self._claimed(job, result)
        taken_count = sum(not isinstance(r, StoreError) for r in outcomes)
        if taken_count < slots and any(isinstance(r, NotClaimed) and not isinstance(r, NotAfter)
                                       for r in outcomes):
            # Free slots here, yet candidates refused: a cluster-wide limit holds them
            # until a job ends somewhere (the follower wakes us), or a second passes.
            self._cluster_full_until = anyio.current_time() + 1.0
        if claims:
            self._wake()
        return results[: len(first)]

    async def _move_early(self, job: Job) -> None:
        """Move a job being claimed into processing/; the attempt claims it again (a no-op
        then) and reports a file that cannot be moved."""
        with contextlib.suppress(FileMissing, FileChanged, OSError):
            await self.files.claim(job)

    def _limits(self, slots: int) -> ClaimLimits:
        """A claim's limits: this node's free slots, the cluster's and each workflow's."""
        per_workflow = {name: workflow.config.concurrency
                        for name, workflow in self.workflows.items()
                        if workflow.config.concurrency is not None}
        return ClaimLimits(slots=slots, running=self.cluster_concurrency,
                           per_workflow=per_workflow)

    def _claimed(self, job: Job, result: list[StoredEvent] | StoreError) -> None:
        if isinstance(result, StoreError):
            self._release(job)
            if isinstance(result, NotClaimed):
                self.queue.push(job)
            elif isinstance(result, ConcurrencyConflict):
                self._tg_start(self._refresh_pending, job.id, job.version)
            else:
                self.queue.push(job)
                self._block(job.workflow_name, 1.0)  # the store is failing: breathe
                if self.cluster is not None:
                    # It may have committed all the same (the reply lost with the
                    # connection): the heartbeat recovers it if the log shows it here.
                    self._unsure_claims[job.id] = job.version
            return
        self._unsure_claims.pop(job.id, None)
        running = self._apply(job, result)
        self._running[job.id].job = running
        self._tg_start(self._run_claimed, running)

    async def _run_claimed(self, job: Job) -> None:
        attempt = self._running[job.id]
        workflow = self.workflows[job.workflow_name]
        # Claimed while the lease had lapsed (the claim was on its way when the database
        # went away): start once it is renewed, unless stopped meanwhile (a shutdown, or
        # another node that recovered the job: the follower stops the attempt).
        if not self._lease_ok and attempt.stop_reason is None:
            with anyio.CancelScope() as scope:
                attempt.scope = scope  # a stop ends the wait (and the attempt, at once)
                await self._lease_renewed.wait()
            attempt.scope = None
        outcome = await run_attempt(attempt, workflow.processor, workflow.config,
                                    self.files, self.executor)
        await self._finish(attempt, workflow.config, outcome)

    async def _finish(self, attempt: Attempt, config: WorkflowConfig, outcome: Outcome) -> None:
        """Record an attempt's outcome durably, hand its slot on, then move its file."""
        attempt.finishing = True
        job = attempt.job
        if outcome.cancelled:
            self._release(job)
            await self._settle(await self._fresh_job(job.id))
            return
        self._release(job)
        # On one node the slot stays taken for the scheduler until the outcome is recorded.
        # In a cluster the store checks the limits against the log under its lock, where
        # this job runs until its outcome lands: the scheduler's own claims may share the
        # outcome's commit (holding the slot back cost a commit of its own per job).
        held = self.cluster is None
        if held:
            self._finishing[job.id] = job.workflow_name
            self._finishing_by_workflow[job.workflow_name] = \
                self._finishing_by_workflow.get(job.workflow_name, 0) + 1
        try:
            ended = await self._record_outcome(attempt, config, outcome)
        finally:
            if held:
                del self._finishing[job.id]
                self._finishing_by_workflow[job.workflow_name] -= 1
                self._wake()
        await self._settle(ended)

    async def _record_outcome(self, attempt: Attempt, config: WorkflowConfig,
                              outcome: Outcome) -> Job | None:
        """Append the outcome (with the claims its slot goes to) until the log takes it;
        the job as it ended (or as the log has it, when it was cancelled meanwhile)."""
        job = attempt.job
        conflicts = 0
        store_failures = 0
        while True:
            events = self._outcome_events(attempt, config, outcome)
            (result,) = await self._commit([(job, events)], *self._pick_claims(handover=job))
            if not isinstance(result, StoreError):
                return self._apply(job, result)
            if isinstance(result, ConcurrencyConflict):
                conflicts += 1
                if conflicts > CONFLICT_RETRIES_MAX:
                    raise result
            elif not isinstance(result, StoreFull | StoreUnavailable):
                if outcome.error_type == "OutcomeRefused":
                    raise result  # even the plain failure cannot be stored: a bug
                # The log refused this outcome (it cannot be stored): record that instead.
                outcome = Outcome(error_type="OutcomeRefused", retryable=False,
                                  message=f"the outcome could not be recorded: {result}"[:2000])
            else:
                # The store is full or down: the outcome must not be lost, so wait and try
                # again (until it works, or shutdown cancels us and recovery takes over).
                store_failures += 1
                await anyio.sleep(min(STORE_RETRY_MAX_S, 0.1 * 2**min(store_failures, 6)))
            fresh = await self._fresh_job(job.id)
            if fresh is None or fresh.status is not Status.RUNNING or \
                    fresh.attempts != job.attempts:
                return fresh  # cancelled meanwhile: its result is fenced off
            job = attempt.job = fresh

    async def _fresh_job(self, job_id: str) -> Job | None:
        """The job as the log has it, read again until the store answers.

        A store that is down (or full) here must not end the manager's task group, and
        with it the node: the reader waits with backoff, as the outcome's commit does
        (shutdown cancels the wait, and recovery takes over).
        """
        failures = 0
        while True:
            try:
                return await self.store.get_job(job_id)
            except (StoreFull, StoreUnavailable):
                failures += 1
                await anyio.sleep(min(STORE_RETRY_MAX_S, 0.1 * 2**min(failures, 6)))

    def _outcome_events(self, attempt: Attempt, config: WorkflowConfig, outcome: Outcome
                        ) -> list[Event]:
        job, at = attempt.job, self.clock.now()
        events: list[Event] = []
        if attempt.latest is not None and attempt.latest != attempt.sent:
            fraction, message = attempt.latest
            events += decide(job, ReportProgress(job_id=job.id, at=at, attempt=job.attempts,
                                                 fraction=fraction, message=message))
        command: AnyCommand
        if outcome.error_type is None:
            command = outcome.completion(job, at)
        else:
            when = None if not outcome.retryable else retry_at(
                config, job.attempts, outcome.error_type, at, self.entropy.random())
            command = FailJob(job_id=job.id, at=at, attempt=job.attempts,
                              error_type=outcome.error_type, message=outcome.message,
                              traceback=outcome.traceback, retry_at=when)
        return events + decide(job, command)

    async def _settle(self, job: Job | None) -> None:
        if job is None:
            return
        if not job.is_active:
            self._jobs.pop(job.id, None)  # finished, perhaps by someone else: no stale copy
        if job.is_active:
            self._admit(job)  # failed with a retry: back to the queue at its retry_at
        else:
            await self._settle_file(job)

    # -- helpers -----------------------------------------------------------------------

    def _workflow(self, name: str) -> Workflow:
        workflow = self.workflows.get(name)
        if workflow is None:
            raise Rejected("not_found", f"no workflow named {name!r} is registered")
        return workflow

    def _block(self, workflow_name: str, seconds: float) -> None:
        self._blocked_until[workflow_name] = anyio.current_time() + seconds

    def _tg_start(self, func: Any, *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("the JobManager is not running: call run() first")
        self._tg.start_soon(func, *args)

    async def _decide_and_append(self, job_id: str, make: Any) -> Job:
        """Decide a command against the freshest state and append it; retry on conflicts."""
        for _ in range(CONFLICT_RETRIES_MAX):
            job = self._jobs.get(job_id) or await self.store.get_job(job_id)
            if job is None:
                raise Rejected("not_found", f"job {job_id} does not exist")
            events = decide(job, make(job))
            try:
                stored = await self.store.append(job_id, events, job.version)
            except ConcurrencyConflict:
                fresh = await self.store.get_job(job_id)
                if fresh is not None and fresh.is_active:
                    self._jobs[job_id] = fresh
                else:
                    self._jobs.pop(job_id, None)
                continue
            new = self._apply(job, stored)
            attempt = self._running.get(job_id)
            if attempt is not None and new.status is Status.RUNNING and \
                    new.attempts == attempt.job.attempts:
                attempt.job = new  # still its attempt (a duplicate record, say)
            return new
        raise Rejected("conflict", f"job {job_id} kept changing; try again")

    def _apply(self, job: Job | None, stored: Sequence[StoredEvent]) -> Job:
        """Fold our own appended events into the manager's view of the job."""
        was_active = job is None or job.is_active
        for event in stored:
            job = apply(job, event)
        assert job is not None
        if job.is_active:
            self._jobs[job.id] = job
        else:
            self._jobs.pop(job.id, None)
            if was_active:  # it just finished: its file is on its way
                self._unsettled.add(job.id)
        return job

    async def _settle_file(self, job: Job) -> None:
        """Move a terminal job's file, then wake whoever waits for the job."""
        try:
            await self.files.settle(job)
        finally:
            self._done_here(job.id)

    def _done_here(self, job_id: str) -> None:
        """A job's file is where it ends (or another node moves it): wake its waiters."""
        self._unsettled.discard(job_id)
        if not self._unsettled:
            self._all_settled.set()
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None:
            waiter.set()
