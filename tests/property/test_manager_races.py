"""Minimal repros of JobManager races that the simulation found or its fakes make reachable.

Each test drives one race on virtual time with the simulation's fakes and says
what a user of a job system would expect. Every test pins a race that was found and
fixed: the scheduler's spins, the clock stepping back, cancels racing attempts, intake
and claims, operator retries of a job still winding down, undecodable error messages,
the store outages and the interrupted job, and the file left in input/.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from adapters.files import ERROR_SUFFIX, HotFolders
from adapters.memory import MemoryEventStore
from kernel import layout
from kernel.config import WorkflowConfig
from kernel.decide import CancelJob, CreateJob, StartJob, decide
from kernel.events import JobFailed, JobStarted
from kernel.manager import JobManager
from kernel.ports import Append, StoreError, StoreUnavailable
from kernel.queue import JobQueue
from kernel.state import Job, Status, StoredEvent
from kernel.task import BaseProcessor, JobContext
from tests.property.sim import (
    FaultyStore,
    SimClock,
    SimEntropy,
    SimExecutor,
    SimFiles,
    VirtualTimeLoop,
    busy_warps,
)

WF = "alpha"
FAST = WorkflowConfig(backoff_base_s=0.5, backoff_jitter=0.0, max_attempts=3, timeout_s=600.0,
                      progress_interval_s=0.0)
ONE_ATTEMPT = WorkflowConfig(max_attempts=1, timeout_s=600.0)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


class Scripted(BaseProcessor):
    """Per attempt: sleep, maybe report progress, then return or raise what the test says."""

    def __init__(self, script: dict[int, tuple[float, BaseException | None]],
                 progress: bool = False) -> None:
        self.script = script
        self.progress = progress
        self.failing = anyio.Event()
        self.runs: list[tuple[str, int]] = []
        self.stopped: list[tuple[str, int]] = []

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        job = ctx.job
        self.runs.append((job.id, job.attempts))
        seconds, error = self.script.get(job.attempts, (0.1, None))
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.stopped.append((job.id, job.attempts))
            raise
        if self.progress:
            ctx.progress(0.5, "half way")
        if error is not None:
            self.failing.set()
            raise error
        return {"attempt": job.attempts}


class World:
    """A manager on the simulation's fakes, one workflow, nothing random."""

    def __init__(self, *, concurrency: int = 1, cleanup_s: float = 0.0,
                 refuse: bool = False) -> None:
        self.clock = SimClock()
        self.store = FaultyStore(random.Random(0), self.clock)
        self.files = SimFiles(random.Random(0), refuse_p=1.0 if refuse else 0.0)
        self.executor = SimExecutor(cleanup_s)
        self.manager = JobManager(self.store, self.files, self.executor, clock=self.clock,
                                  entropy=SimEntropy(random.Random(0)),
                                  concurrency=concurrency)

    async def submit(self, name: str = "a.pdf") -> str:
        self.files.drop(WF, name)
        return (await self.manager.submit(WF, layout.input_path(WF, name))).job.id


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in leaves(inner)]
    return [group]


@asynccontextmanager
async def running(world: World, processor: BaseProcessor,
                  config: WorkflowConfig = FAST) -> AsyncIterator[JobManager]:
    """Run the world's manager; a crash of its task group becomes an AssertionError."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(world.manager.run)
            await world.manager.register_workflow(WF, processor, config=config)
            yield world.manager
            await anyio.sleep(1.0)  # let a late crash of the manager's own tasks surface
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        errors = leaves(group)
        crashes = [e for e in errors if not isinstance(e, AssertionError)]
        if crashes:
            raise AssertionError(f"the manager crashed: {crashes!r}") from group
        raise errors[0] from None


async def finished(manager: JobManager, job_id: str, timeout_s: float) -> Job:
    """`wait`, with a timeout that reads as a failed assertion."""
    try:
        return await manager.wait(job_id, timeout_s)
    except TimeoutError:
        seen = await manager.get_job(job_id)
        logged = await manager.store.get_job(job_id)
        raise AssertionError(
            f"wait({job_id}) timed out: the manager sees {seen.status if seen else None}, "
            f"the log says {logged.status if logged else None}") from None


def outage_of(appends_matching: Any, times: int = 1) -> Any:
    """A store hook that fails the first `times` append groups the predicate picks."""
    left = [times]

    async def hook(appends: Sequence[Append]) -> list[StoreError] | None:
        if left[0] > 0 and appends_matching(appends):
            left[0] -= 1
            await anyio.lowlevel.checkpoint()
            return [StoreUnavailable("test: the store is down") for _ in appends]
        return None

    return hook


def claims(appends: Sequence[Append]) -> bool:
    return any(isinstance(e, JobStarted) for a in appends for e in a.events)


def refusals(appends: Sequence[Append]) -> bool:
    return any(isinstance(e, JobFailed) and e.attempt == 0 for a in appends for e in a.events)


# -- the scheduler spins ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_due_retry_waiting_for_a_busy_slot_lets_the_scheduler_sleep() -> None:
    """While the only slot is busy for 30 s, a retry that fell due does not make the loop spin."""
    world = World(concurrency=1)
    processor = Scripted({1: (0.1, ValueError("first attempt fails")), 2: (0.1, None)})
    long_one = Scripted({1: (30.0, None)})

    class ByName(BaseProcessor):
        async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
            chosen = long_one if ctx.job.file_path.endswith("long.pdf") else processor
            return await chosen.process(ctx, task)

    async with running(world, ByName()) as manager:
        flaky = await world.submit("flaky.pdf")
        await anyio.sleep(0.05)
        slow = await world.submit("long.pdf")
        await finished(manager, slow, 60)
        await finished(manager, flaky, 60)
        assert busy_warps() == 0, f"the event loop spun {busy_warps()} times without sleeping"


@pytest.mark.anyio
async def test_an_expired_block_of_a_workflow_without_jobs_lets_the_scheduler_sleep() -> None:
    """A claim that failed on a store outage blocks its workflow 1 s; after that, idle is idle."""
    world = World()
    world.store.hook = outage_of(claims)
    async with running(world, Scripted({})) as manager:
        job_id = await world.submit()
        await anyio.sleep(0.5)  # the claim failed; the workflow is blocked for 1 s
        await manager.cancel(job_id, actor="test")
        await anyio.sleep(5.0)
        assert busy_warps() == 0, f"the event loop spun {busy_warps()} times without sleeping"


# -- the manager crashes ---------------------------------------------------------------


class SteppingQueue(JobQueue):
    """The real queue; the wall clock steps back 5 s right after it hands out a retry."""

    def __init__(self, clock: SimClock) -> None:
        super().__init__(60.0)
        self.clock = clock
        self.armed = True

    def pick(self, now: datetime, can_run: Any = lambda job: True) -> Job | None:
        job = super().pick(now, can_run)
        if job is not None and job.retry_at is not None and self.armed:
            self.armed = False
            self.clock.step(-5.0)  # an NTP step back, between the pick and the claim
        return job


@pytest.mark.anyio
async def test_a_clock_step_back_between_pick_and_claim_does_not_crash_the_manager() -> None:
    """A wall clock stepping back just after a due retry was picked delays it, nothing worse."""
    world = World()
    world.manager.queue = SteppingQueue(world.clock)
    processor = Scripted({1: (0.1, ValueError("first attempt fails"))})
    async with running(world, processor) as manager:
        job_id = await world.submit()
        job = await finished(manager, job_id, 120)
        assert job.status is Status.COMPLETED and job.attempts == 2


@pytest.mark.anyio
async def test_a_cancel_during_the_cleanup_of_a_failed_attempt_does_not_crash() -> None:
    """A processor failed and its cleanup takes a second; a cancel meanwhile wins, calmly."""
    world = World(cleanup_s=1.0)
    processor = Scripted({1: (0.1, ValueError("boom"))})
    async with running(world, processor) as manager:
        job_id = await world.submit()
        await processor.failing.wait()
        await anyio.sleep(0.2)  # the attempt's cleanup runs
        await manager.cancel(job_id, actor="test")
        job = await finished(manager, job_id, 30)
        assert job.status is Status.CANCELLED


@pytest.mark.anyio
async def test_progress_waiting_to_be_flushed_after_a_cancel_does_not_crash() -> None:
    """Progress reported just before a cancel is dropped (or kept), never a crash."""
    world = World(cleanup_s=2.0)
    processor = Scripted({1: (0.1, ValueError("boom"))}, progress=True)
    async with running(world, processor) as manager:
        job_id = await world.submit()
        await processor.failing.wait()
        await manager.cancel(job_id, actor="test")
        await anyio.sleep(0.5)  # several progress flushes, all within the 2 s cleanup


@pytest.mark.anyio
async def test_an_intake_refusal_racing_a_cancel_does_not_crash_the_manager() -> None:
    """The user's cancel commits first; the refusal then has nothing to do."""
    world = World(refuse=True)
    job_ids: list[str] = []
    racing = [True]

    async def cancel_first(appends: Sequence[Append]) -> list[StoreError] | None:
        if racing[0] and refusals(appends):
            racing[0] = False
            await world.manager.cancel(job_ids[0], actor="test")
        return None

    world.store.hook = cancel_first
    async with running(world, Scripted({})) as manager:
        job_ids.append(await world.submit())
        job = await finished(manager, job_ids[0], 30)
        assert job.status is Status.CANCELLED


@pytest.mark.anyio
async def test_a_store_outage_during_an_intake_refusal_does_not_crash_the_manager() -> None:
    """The refusal is recorded once the store answers again."""
    world = World(refuse=True)
    world.store.hook = outage_of(refusals)
    async with running(world, Scripted({})) as manager:
        job_id = await world.submit()
        job = await finished(manager, job_id, 60)
        assert job.status is Status.FAILED and job.attempts == 0


@pytest.mark.anyio
async def test_an_error_message_that_is_not_utf8_still_fails_the_job() -> None:
    """A processor error naming a file with undecodable bytes ends as an ordinary JobFailed."""
    world = World()
    processor = Scripted({1: (0.1, FileNotFoundError("no such file: b'\\xff' \udcff.pdf"))})
    async with running(world, processor, ONE_ATTEMPT) as manager:
        job_id = await world.submit()
        job = await finished(manager, job_id, 30)
        assert job.status is Status.FAILED and job.error is not None
        assert job.error.type == "FileNotFoundError"


# -- jobs left behind ------------------------------------------------------------------


def appends_fail_while(world: World, down: list[bool]) -> None:
    """The store refuses every append as unavailable while `down[0]`."""

    async def outage(appends: Sequence[Append]) -> list[StoreError] | None:
        return [StoreUnavailable("test: down") for _ in appends] if down[0] else None

    world.store.hook = outage


async def outcome_across_outage(world: World, down: list[bool]) -> str:
    """A 1 s job whose processor finishes during a 4 s outage; its id once it completed."""
    async with running(world, Scripted({1: (1.0, None)})) as manager:
        job_id = await world.submit()
        await anyio.sleep(0.5)
        down[0] = True
        await anyio.sleep(4.0)
        down[0] = False
        job = await finished(manager, job_id, 60)
        assert job.status is Status.COMPLETED
    return job_id


@pytest.mark.anyio
async def test_an_outcome_is_recorded_after_a_store_outage_of_a_few_seconds() -> None:
    """The store is down for 4 s as a processor finishes; its result is recorded afterwards."""
    world = World()
    down = [False]
    appends_fail_while(world, down)
    await outcome_across_outage(world, down)


def reads_fail_while(world: World, down: list[bool]) -> None:
    """The store's job reads fail while `down[0]`, as they do when PostgreSQL goes away."""
    read = world.store.inner.get_job

    async def get_job(job_id: str) -> Job | None:
        await anyio.lowlevel.checkpoint()
        if down[0]:
            raise StoreUnavailable("test: down")
        return await read(job_id)

    world.store.get_job = get_job  # type: ignore[method-assign]


@pytest.mark.anyio
async def test_an_outcome_waits_out_an_outage_that_fails_the_reads_too() -> None:
    """PostgreSQL going away fails the outcome's commit and the re-read of the job after
    it: the manager waits for the store (it used to crash, and the node with it), then
    records the outcome once."""
    world = World()
    down = [False]
    appends_fail_while(world, down)
    reads_fail_while(world, down)
    job_id = await outcome_across_outage(world, down)
    events = await world.store.inner.read_job(job_id)
    assert sum(type(e.event).__name__ == "JobCompleted" for e in events) == 1


@pytest.mark.anyio
async def test_a_cancelled_attempt_waits_out_an_outage_to_settle() -> None:
    """The store goes away just as a cancelled processor stops: reading the job back to
    settle it waits for the store instead of ending the manager."""
    world = World()
    down = [False]
    reads_fail_while(world, down)
    processor = Scripted({1: (30.0, None)})
    async with running(world, processor) as manager:
        job_id = await world.submit()
        await anyio.sleep(1.0)
        await manager.cancel(job_id, actor="test")
        down[0] = True  # before the processor's runner reads the job back
        await anyio.sleep(3.0)
        assert processor.stopped == [(job_id, 1)]
        down[0] = False
        job = await finished(manager, job_id, 30)
        assert job.status is Status.CANCELLED


@pytest.mark.anyio
async def test_a_cancel_by_another_node_reaches_the_managers_view() -> None:
    """A running job cancelled straight in the shared log is seen cancelled once it stops."""
    world = World()
    async with running(world, Scripted({1: (2.0, None)})) as manager:
        job_id = await world.submit()
        await anyio.sleep(1.0)
        await world.store.cancel_elsewhere(job_id)
        job = await finished(manager, job_id, 30)
        assert job.status is Status.CANCELLED


@pytest.mark.anyio
async def test_a_cancel_committed_before_the_claim_is_applied_is_not_lost() -> None:
    """The claim commits, a cancel commits right after, then the manager applies its claim."""
    world = World()
    done = [False]

    async def commit_then_cancel(appends: Sequence[Append]
                                 ) -> list[list[StoredEvent] | StoreError] | None:
        # As with SQLite's group commit, where the claiming task leads the group and keeps
        # writing the groups that arrive meanwhile (a cancel's retry among them).
        if done[0] or not claims(appends):
            return None
        done[0] = True
        results = await world.store.inner.append_batch(appends)
        await world.manager.cancel(appends[0].job_id, actor="test")
        return results

    world.store.hook = commit_then_cancel
    async with running(world, Scripted({1: (5.0, None)})) as manager:
        job_id = await world.submit()
        job = await finished(manager, job_id, 30)
        assert job.status is Status.CANCELLED
        assert world.files.find(job) == job.current_path


@pytest.mark.anyio
async def test_an_operator_retry_right_after_a_cancel_is_tracked_as_running() -> None:
    """Cancel, then retry at once: the second attempt is the manager's running job."""
    world = World(concurrency=2, cleanup_s=1.0)
    processor = Scripted({1: (100.0, None), 2: (5.0, None)})
    async with running(world, processor) as manager:
        job_id = await world.submit()
        await anyio.sleep(0.5)
        await manager.cancel(job_id, actor="test")
        await manager.retry(job_id, actor="test")
        await anyio.sleep(2.0)  # the first attempt's cleanup is over, the second one runs
        assert (job_id, 2) in processor.runs
        assert [job.id for job in manager.running_jobs()] == [job_id]


@pytest.mark.anyio
async def test_waiting_for_a_finished_job_that_got_a_duplicate_returns() -> None:
    """A duplicate recorded against a completed job does not make wait() hang."""
    world = World()
    async with running(world, Scripted({})) as manager:
        job_id = await world.submit()
        await finished(manager, job_id, 30)
        await manager.record_duplicate(job_id, file_path=f"{WF}/input/a.pdf",
                                       stored_path=f"{WF}/archive/duplicates/x")
        job = await finished(manager, job_id, 30)
        assert job.duplicates == 1


async def crashed_log(store: MemoryEventStore, clock: SimClock, *, started: bool) -> None:
    """The log a process left when it died: job J1 created, then started (or cancelled)."""
    created = decide(None, CreateJob(job_id="J1", at=clock.now(), workflow_name=WF,
                                     file_path=layout.input_path(WF, "a.pdf")))
    await store.append("J1", created, 0)
    job = await store.get_job("J1")
    assert job is not None
    then = StartJob(job_id="J1", at=clock.now()) if started else \
        CancelJob(job_id="J1", at=clock.now(), actor="cli")
    await store.append("J1", decide(job, then), 1)


async def recovered(store: MemoryEventStore, files: HotFolders, clock: SimClock) -> Job:
    """A new process registers the workflow and waits for J1."""
    manager = JobManager(store, files, SimExecutor(), clock=clock,
                         entropy=SimEntropy(random.Random(0)))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            await manager.register_workflow(WF, Scripted({}), config=ONE_ATTEMPT)
            job = await finished(manager, "J1", 2.0)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise leaves(group)[0] from None
    return job


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_job_left_running_with_no_attempts_left_is_settled_at_recovery(
        tmp_path: Path) -> None:
    """The process died between the claim and the file's move; recovery puts it in error/."""
    store, files, clock = MemoryEventStore(), HotFolders(tmp_path), SimClock()
    files.ensure_layout(WF)
    (tmp_path / WF / "input" / "a.pdf").write_bytes(b"%PDF-1.4 ... %%EOF")
    await crashed_log(store, clock, started=True)
    job = await recovered(store, files, clock)
    assert job.status is Status.FAILED
    assert (tmp_path / job.current_path).is_file(), "the file is still in input/"
    assert (tmp_path / (job.current_path + ERROR_SUFFIX)).is_file()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_job_cancelled_before_its_claim_is_settled_at_recovery(tmp_path: Path) -> None:
    """The process died between a durable JobCancelled and the file's move to error/."""
    store, files, clock = MemoryEventStore(), HotFolders(tmp_path), SimClock()
    files.ensure_layout(WF)
    dropped = tmp_path / WF / "input" / "a.pdf"
    dropped.write_bytes(b"%PDF-1.4 ... %%EOF")
    written_s = (clock.now() - timedelta(minutes=1)).timestamp()  # before the cancel
    os.utime(dropped, (written_s, written_s))
    await crashed_log(store, clock, started=False)
    job = await recovered(store, files, clock)
    assert job.status is Status.CANCELLED
    assert not (tmp_path / WF / "input" / "a.pdf").exists(), "the file is still in input/"
    assert (tmp_path / job.current_path).is_file()
