"""A seeded, deterministic simulation of the whole JobManager, with fakes and faults.

Each seed pushes 30 jobs through three workflows on virtual time: processors that
succeed, fail, report progress or outlive their timeout; intake refusals and a
scanner that goes away; claims that fail on the disk or find the file gone; a
store that fails whole groups, and another node that cancels jobs as they are
claimed; random cancels, duplicate submits and operator retries; a wall clock that
steps forward and back; and a crash halfway (no drain) after which a second
manager recovers the same log and folders. The log is the oracle for everything.

A scheduler that spins without waiting fails it. Counted as `known` (shown on
failure) is a slot handed on before the outcome that freed it is durable (see
`concurrency_breaches`): the log may show one more job running than the limit while
the processors never overlap. Anything else fails it. Every job must
end terminal: with virtual time the run waits out every retry.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from typing import Any

import anyio
import pytest

from adapters.files import ERROR_SUFFIX
from kernel import layout
from kernel.chain import verify
from kernel.config import WorkflowConfig
from kernel.decide import Rejected
from kernel.events import (
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobRetried,
    JobStarted,
)
from kernel.manager import JobManager
from kernel.ports import StoreError
from kernel.state import Job, Status, StoredEvent, replay
from tests.property.sim import (
    FaultyStore,
    SimClock,
    SimEntropy,
    SimExecutor,
    SimFiles,
    SimProcessor,
    Tracker,
    VirtualTimeLoop,
    busy_warps,
)

SEEDS = range(20)
JOBS = 30
EVERYTHING = 10**9
SIM_DEADLINE_S = 12 * 3600.0  # virtual seconds: a run that needs more is stuck
SETTLE_S = 3600.0
WAIT_S = 30.0
RETRIES_PER_JOB_MAX = 2
STEP = dict(timeout_s=20.0, backoff_base_s=0.5, backoff_max_s=8.0, progress_interval_s=0.3)
WORKFLOWS: dict[str, WorkflowConfig] = {
    "alpha": WorkflowConfig(max_attempts=4, **STEP),  # type: ignore[arg-type]
    "beta": WorkflowConfig(concurrency=1, max_attempts=4, **STEP),  # type: ignore[arg-type]
    "gamma": WorkflowConfig(max_attempts=2, timeout_s=5.0, backoff_base_s=1.0,
                            backoff_max_s=4.0, progress_interval_s=0.3),
}


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"loop_factory": VirtualTimeLoop})


class Simulation:
    """One seed's world: the fakes, the driver playing users, and what it saw."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.concurrency = 1 + seed % 4
        self.clock = SimClock()
        self.entropy = SimEntropy(random.Random(f"{seed}/ids"))
        self.store = FaultyStore(random.Random(f"{seed}/store"), self.clock,
                                 unavailable_p=0.04, race_p=0.08)
        self.files = SimFiles(random.Random(f"{seed}/files"), refuse_p=0.08,
                              scanner_down_p=0.05, claim_error_p=0.05, vanish_p=0.02)
        self.tracker = Tracker()
        self.executor = SimExecutor()
        self.processors = {name: SimProcessor(random.Random(f"{seed}/{name}"), self.tracker)
                           for name in WORKFLOWS}
        self.jobs: list[str] = []
        self.tags: dict[str, str | None] = {}  # job id -> the file dropped for it
        self.retried: Counter[str] = Counter()
        self.problems: list[str] = []
        self.known: Counter[str] = Counter()
        self.hung_waits: list[str] = []
        self.crash_seq = 0
        self.names = 0
        self.view: dict[str, Job | None] = {}
        self.leftovers: tuple[list[Job], int] = ([], 0)

    def manager(self) -> JobManager:
        return JobManager(self.store, self.files, self.executor, clock=self.clock,
                          entropy=self.entropy, concurrency=self.concurrency)

    async def run(self) -> None:
        """Half the jobs, a crash, a second manager recovers, the rest, then quiet."""
        crash_after = self.rng.randint(JOBS // 4, 3 * JOBS // 4)
        with anyio.fail_after(SIM_DEADLINE_S):
            async with anyio.create_task_group() as tg:
                first = self.manager()
                await tg.start(first.run)
                await self.register(first)
                await self.act(first, crash_after)
                tg.cancel_scope.cancel()  # the crash: no drain, running jobs stay running
            self.crash_seq = await self.store.last_seq()
            async with anyio.create_task_group() as tg:
                second = self.manager()
                await tg.start(second.run)
                await self.register(second)
                await self.act(second, JOBS - crash_after)
                await self.settle_down(second)
                await second.drain(5.0)
                self.view = {job_id: await second.get_job(job_id) for job_id in self.jobs}
                self.leftovers = (second.running_jobs(), len(second.queue))
                tg.cancel_scope.cancel()
        self.known["busy_loop_warps"] = busy_warps()

    async def register(self, manager: JobManager) -> None:
        self.store.enabled = False  # recovery's own appends are not what is under test here
        for name, config in WORKFLOWS.items():
            await manager.register_workflow(name, self.processors[name], config=config)
        self.store.enabled = True

    # -- the users -----------------------------------------------------------------------

    async def act(self, manager: JobManager, submits: int) -> None:
        for _ in range(submits):
            await anyio.sleep(self.rng.expovariate(1.5))
            if self.rng.random() < 0.1:
                await self.step_clock()
            await self.submit(manager)
            if self.jobs and self.rng.random() < 0.12:
                await self.submit_again(manager, self.rng.choice(self.jobs))
            if self.jobs and self.rng.random() < 0.2:
                await self.cancel(manager, self.rng.choice(self.jobs))
            if self.rng.random() < 0.2:
                await self.retry(manager)

    async def step_clock(self) -> None:
        """The wall clock jumps, forward or back."""
        self.clock.step(self.rng.choice([45.0, 400.0, -0.7, -4.0]))

    async def name_for(self, workflow_name: str) -> str:
        """Mostly a new name; sometimes an earlier one whose job and file have moved on."""
        if self.jobs and self.rng.random() < 0.15:
            name = f"doc-{self.rng.choice(self.jobs)}.pdf"
            path = layout.input_path(workflow_name, name)
            if path not in self.files.disk and \
                    await self.store.find_active(workflow_name, path) is None:
                return name
        self.names += 1
        return f"doc-n{self.names}.pdf"

    async def submit(self, manager: JobManager) -> None:
        wf = self.rng.choice(sorted(WORKFLOWS))
        name = await self.name_for(wf)
        tag = self.files.drop(wf, name)
        try:
            submitted = await manager.submit(wf, layout.input_path(wf, name),
                                             priority=self.rng.randint(-2, 2))
        except StoreError:
            return  # the file stays in input/ without a job
        if not submitted.created:
            self.problems.append(f"a new file got the existing job {submitted.job.id}")
            return
        self.jobs.append(submitted.job.id)
        self.tags[submitted.job.id] = tag

    async def submit_again(self, manager: JobManager, job_id: str) -> None:
        """The same path submitted twice: while its job is active, the answer is that job."""
        job = await self.store.get_job(job_id)
        assert job is not None
        try:
            submitted = await manager.submit(job.workflow_name, job.file_path)
        except StoreError:
            return
        if submitted.created:  # the job had ended; its file is no longer in input/
            self.jobs.append(submitted.job.id)
            self.tags[submitted.job.id] = None
            return
        owner = await self.store.find_active(job.workflow_name, job.file_path)
        latest = await self.store.get_job(submitted.job.id)
        answered_active = latest is not None and latest.is_active
        if answered_active and (owner is None or owner.id != submitted.job.id):
            self.problems.append(f"a second submit of {job.file_path} answered "
                                 f"{submitted.job.id}, but the file's active job is {owner}")

    async def cancel(self, manager: JobManager, job_id: str) -> None:
        with contextlib.suppress(Rejected, StoreError):  # finished already; store down
            await manager.cancel(job_id, actor="sim", reason="a user changed their mind")

    async def retry(self, manager: JobManager) -> None:
        done = []
        for job_id in self.jobs:
            job = await self.store.get_job(job_id)
            if job is not None and job.status in (Status.FAILED, Status.CANCELLED) \
                    and self.retried[job_id] < RETRIES_PER_JOB_MAX:
                done.append(job_id)
        if not done:
            return
        job_id = self.rng.choice(done)
        self.retried[job_id] += 1
        with contextlib.suppress(Rejected, StoreError):  # e.g. another job holds the file
            await manager.retry(job_id, actor="sim", reason="try once more")

    async def settle_down(self, manager: JobManager) -> None:
        """Let the log go quiet, then ask the manager to wait for every job."""
        for _ in range(int(SETTLE_S)):
            if not await self.store.active_jobs():
                break
            await anyio.sleep(1.0)
        for job_id in self.jobs:
            try:
                await manager.wait(job_id, timeout_s=WAIT_S)
            except TimeoutError:
                self.hung_waits.append(job_id)

    # -- the verdict ---------------------------------------------------------------------

    async def verdict(self) -> list[str]:
        """Everything the log, the store, the manager and the folders must agree on."""
        log = await self.store.read_all(0, EVERYTHING)
        oracle = replay(log)
        problems = list(self.problems)
        if set(oracle) != set(self.jobs):
            problems.append(f"jobs in the log {sorted(oracle)} != jobs submitted {self.jobs}")
        problems += [f"{job.id} is still {job.status}" for job in oracle.values() if job.is_active]
        completions = Counter(s.job_id for s in log if isinstance(s.event, JobCompleted))
        problems += [f"{job_id} completed {n} times" for job_id, n in completions.items() if n > 1]
        breaches, explained = concurrency_breaches(log, self.crash_seq, self.concurrency,
                                                   self.store.refused_outcomes)
        problems += breaches
        problems += retry_policy_breaches(log)
        self.known["log_shows_a_slot_reused_before_the_outcome_was_durable"] += explained
        problems += self.waits_returned()
        problems += await self.views_agree(oracle)
        problems += self.folders_agree(oracle)
        report = verify(await self.store.read_chain(0, EVERYTHING))
        if not report.ok or report.checked != len(log):
            problems.append(f"chain broken at {report.first_bad_seq}: {report.reason}")
        if self.tracker.most_at_once > self.concurrency:
            problems.append(f"{self.tracker.most_at_once} processors ran at once, "
                            f"limit {self.concurrency}")
        for wf, most in self.tracker.most_by_workflow.items():
            limit = WORKFLOWS[wf].concurrency
            if limit is not None and most > limit:
                problems.append(f"{most} processors of {wf} ran at once, limit {limit}")
        problems += [odd for odd in self.files.odd if odd.startswith("settle")]
        self.known["claim_of_a_job_no_longer_running"] += sum(
            odd.startswith("claim") for odd in self.files.odd)
        return problems

    def waits_returned(self) -> list[str]:
        """wait() returns for every finished job."""
        return [f"wait({job_id}) did not return within {WAIT_S} s" for job_id in self.hung_waits]

    async def views_agree(self, oracle: dict[str, Job]) -> list[str]:
        problems = []
        for job_id, job in oracle.items():
            if await self.store.get_job(job_id) != job:
                problems.append(f"the store's read model of {job_id} is not its replay")
            seen = self.view.get(job_id)
            if seen != job:
                problems.append(f"the manager sees {job_id} as "
                                f"{seen.status if seen else None} (v{seen.version if seen else 0})"
                                f", the log says {job.status} (v{job.version})")
        active = sorted((j for j in oracle.values() if j.is_active), key=lambda j: j.created_seq)
        if await self.store.active_jobs() != active:
            problems.append("the store's active jobs are not the replay's")
        running, queued = self.leftovers
        if running or queued:
            problems.append(f"after drain {len(running)} jobs run and {queued} wait in the queue")
        return problems

    def folders_agree(self, oracle: dict[str, Job]) -> list[str]:
        """Every terminal job's file lies where its status says, with the right report."""
        problems = []
        where = {tag: path for path, tag in self.files.disk.items()}
        for job in oracle.values():
            if job.is_active:
                continue
            tag = self.tags.get(job.id)
            at = where.get(tag) if tag is not None else None
            if tag is not None and job.id not in self.files.vanished and at != job.current_path:
                problems.append(f"{job.id} is {job.status}: its file should be at "
                                f"{job.current_path}, it is at {at}")
                continue
            report = self.files.reports.get(layout.error_path(job) + ERROR_SUFFIX)
            if job.status is Status.COMPLETED and report is not None:
                problems.append(f"{job.id} completed but has an error report {report}")
            if job.status is not Status.COMPLETED and (report is None
                                                       or report[0] != str(job.status)):
                problems.append(f"{job.id} is {job.status} but its error report is {report}")
        left = sorted(p for p in self.files.disk if "/processing/" in p)
        if left:
            problems.append(f"files left in processing/: {left}")
        return problems


def concurrency_breaches(log: list[StoredEvent], crash_seq: int, limit: int,
                         refused_outcomes: list[tuple[int, str]]) -> tuple[list[str], int]:
    """Walk the log in seq order: no JobStarted while the limits are already reached.

    A job whose outcome append was refused (the store failed, or a progress append
    won the race) still runs in the log while the manager has handed its slot on; a
    start that only such jobs push over the limit is counted apart (the second value).
    """
    workflow_of: dict[str, str] = {}
    running: dict[str, str] = {}
    finishing: set[str] = set()
    refused = sorted(refused_outcomes)
    crashed = False
    problems: list[str] = []
    explained = 0
    for stored in log:
        while refused and refused[0][0] < stored.seq:
            finishing.add(refused.pop(0)[1])
        if not crashed and stored.seq > crash_seq:
            running.clear()  # the crashed process runs nothing any more
            crashed = True
        event = stored.event
        if isinstance(event, JobCreated):
            workflow_of[stored.job_id] = event.workflow_name
        elif isinstance(event, JobStarted):
            wf = workflow_of[stored.job_id]
            wf_limit = WORKFLOWS[wf].concurrency
            busy = [job_id for job_id in running if job_id not in finishing]
            busy_wf = [job_id for job_id in busy if running[job_id] == wf]
            if len(busy) >= limit or (wf_limit is not None and len(busy_wf) >= wf_limit):
                problems.append(f"seq {stored.seq}: {stored.job_id} started while "
                                f"{sorted(running)} ran (limit {limit}, {wf} {wf_limit})")
            elif len(running) >= limit or (wf_limit is not None and
                                           list(running.values()).count(wf) >= wf_limit):
                explained += 1
            running[stored.job_id] = wf
        elif isinstance(event, JobCompleted | JobFailed | JobCancelled):
            running.pop(stored.job_id, None)
            finishing.discard(stored.job_id)
    return problems, explained


def retry_policy_breaches(log: list[StoredEvent]) -> list[str]:
    """Retries only for retryable errors with attempts left; an operator retry adds one."""
    workflow_of: dict[str, str] = {}
    retried: Counter[str] = Counter()
    problems = []
    for stored in log:
        event = stored.event
        if isinstance(event, JobCreated):
            workflow_of[stored.job_id] = event.workflow_name
        config = WORKFLOWS[workflow_of[stored.job_id]]
        if isinstance(event, JobRetried):
            retried[stored.job_id] += 1
        elif isinstance(event, JobStarted) and \
                event.attempt > config.max_attempts + retried[stored.job_id]:
            problems.append(f"seq {stored.seq}: attempt {event.attempt} of {stored.job_id}")
        elif isinstance(event, JobFailed) and event.retry_at is not None and (
                event.attempt >= config.max_attempts or event.error_type == "Corrupt"
                or event.error_type in config.non_retryable):
            problems.append(f"seq {stored.seq}: {stored.job_id} retries after "
                            f"{event.error_type} in attempt {event.attempt}")
    return problems


async def simulate(seed: int) -> Simulation:
    """Run one seed to its end (the simulation raises only if the manager crashed)."""
    sim = Simulation(seed)
    await sim.run()
    return sim


@pytest.mark.anyio
@pytest.mark.parametrize("seed", SEEDS)
async def test_simulation(seed: int) -> None:
    """Under faults, crashes and clock steps, the manager, store and folders agree with the log."""
    try:
        sim = await simulate(seed)
    except Exception as exc:
        raise AssertionError(f"seed {seed}: the simulation raised {exc!r}") from exc
    problems = await sim.verdict()
    if sim.known["busy_loop_warps"]:
        problems.append(f"the scheduler spun without waiting {sim.known['busy_loop_warps']} times")
    known = ", ".join(f"{name}={n}" for name, n in sorted(sim.known.items()) if n)
    assert not problems, (f"seed {seed} (replay: -k 'test_simulation and [{seed}]'):\n"
                          + "\n".join(problems) + f"\nknown bugs seen: {known or 'none'}")


async def _log_of(seed: int) -> list[StoredEvent]:
    sim = await simulate(seed)
    return await sim.store.read_all(0, EVERYTHING)


def test_one_seed_replays_the_same_run() -> None:
    """Two runs of one seed write the same log, event for event: a failure replays exactly."""
    options = {"loop_factory": VirtualTimeLoop}
    first = anyio.run(_log_of, 5, backend="asyncio", backend_options=options)
    second = anyio.run(_log_of, 5, backend="asyncio", backend_options=options)
    assert len(first) > JOBS
    assert first == second
