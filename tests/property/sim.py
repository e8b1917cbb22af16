"""Fakes for simulating the JobManager: virtual time, a fallible store, files, processors.

Everything random draws from a `random.Random` seeded by the test, and the event
loop runs on virtual time, so one seed replays the same run exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import selectors
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.lowlevel

from adapters.files import ERROR_SUFFIX
from adapters.memory import MemoryEventStore
from kernel import layout
from kernel.config import WorkflowConfig
from kernel.decide import CancelJob, decide
from kernel.events import JobCompleted, JobFailed, JobStarted
from kernel.ports import (
    Append,
    FileMissing,
    Refusal,
    ScannerUnavailable,
    StoreError,
    StoreUnavailable,
)
from kernel.state import Job, Status, StoredEvent
from kernel.task import BaseProcessor, BaseTask, JobCancelledError, JobContext, JobError

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REFUSALS = ("TooLarge", "TypeNotAllowed", "Truncated", "Infected")


# -- virtual time ------------------------------------------------------------------------


class _WarpingSelector:
    """The loop's selector, polled without blocking: idle time is skipped, not waited."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        events = self._inner.select(0)
        if events:
            return events
        if timeout is None:
            return self._inner.select(None)  # nothing scheduled: only a thread can wake us
        self._loop.advance(timeout)
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock jumps to the next timer instead of waiting for it.

    A task that never waits for time (a busy loop) would stop virtual time for ever;
    after `busy_iterations_max` iterations without time passing, the loop moves time on
    to its next timer and counts a busy warp, which tests report. Ordinary bursts of
    work at one instant stay far below the threshold (under 20 iterations here).
    Work in a thread would see time fly: use it only where nothing runs in a thread.
    """

    busy_iterations_max = 40

    def __init__(self) -> None:
        super().__init__()
        self.virtual_s = 0.0
        self.busy_warps = 0
        self._stalled = 0
        self._selector = _WarpingSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.virtual_s

    def advance(self, timeout_s: float) -> None:
        """Move virtual time on by an idle loop's timeout, or past a busy loop."""
        if timeout_s > 0:
            self.virtual_s += timeout_s
            self._stalled = 0
            return
        self._stalled += 1
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if self._stalled >= self.busy_iterations_max and scheduled:
            self._stalled = 0
            self.busy_warps += 1
            self.virtual_s = max(self.virtual_s, scheduled[0].when())


def busy_warps() -> int:
    """How often the running virtual-time loop had to move time past a busy loop."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    return loop.busy_warps


class SimClock:
    """Wall time: the loop's virtual time since the clock was made, plus the steps a test takes."""

    def __init__(self, start: datetime = T0) -> None:
        self.start = start
        self.origin_s = anyio.current_time()
        self.offset_s = 0.0

    def now(self) -> datetime:
        elapsed_s = anyio.current_time() - self.origin_s + self.offset_s
        return self.start + timedelta(seconds=elapsed_s)

    def step(self, seconds: float) -> None:
        """An NTP step or a VM resume: the wall clock jumps, forward or back."""
        self.offset_s += seconds


class SimEntropy:
    """Sortable ids from a counter, jitter from a seeded random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.made = 0

    def new_id(self) -> str:
        self.made += 1
        return f"J{self.made:04d}"

    def random(self) -> float:
        return self.rng.random()


# -- the store ---------------------------------------------------------------------------


def is_outcome(append: Append) -> bool:
    """How an attempt ended: JobCompleted, or JobFailed of an attempt."""
    return any(isinstance(e, JobCompleted) or (isinstance(e, JobFailed) and e.attempt > 0)
               for e in append.events)


class FaultyStore:
    """A MemoryEventStore with the faults of a shared store that can fail.

    Whole groups fail with StoreUnavailable (as a failed SQLite commit does, error per
    append), and another node cancels a job just as this one claims it, so the claim
    conflicts. (A cancel by another node of a running job is left to
    test_manager_races.py: the manager does not survive it yet.)
    """

    def __init__(self, rng: random.Random, clock: SimClock, *, unavailable_p: float = 0.0,
                 race_p: float = 0.0) -> None:
        self.inner = MemoryEventStore()
        self.rng, self.clock = rng, clock
        self.unavailable_p, self.race_p = unavailable_p, race_p
        self.enabled = True
        self.faults: Counter[str] = Counter()
        self.refused_outcomes: list[tuple[int, str]] = []  # (last seq then, job id)
        # A test's hook sees each group first; results it returns replace the store's answer.
        self.hook: Callable[[Sequence[Append]],
                            Awaitable[Sequence[list[StoredEvent] | StoreError] | None]] | None \
            = None

    async def append(self, job_id: str, events: Sequence[Any], expected_version: int
                     ) -> list[StoredEvent]:
        (result,) = await self.append_batch([Append(job_id, events, expected_version)])
        if isinstance(result, StoreError):
            raise result
        return result

    async def append_batch(self, appends: Sequence[Append]
                           ) -> list[list[StoredEvent] | StoreError]:
        results = await self._append_batch(appends)
        for append, result in zip(appends, results, strict=True):
            if isinstance(result, StoreError) and is_outcome(append):
                self.refused_outcomes.append((await self.inner.last_seq(), append.job_id))
        return results

    async def _append_batch(self, appends: Sequence[Append]
                            ) -> list[list[StoredEvent] | StoreError]:
        if self.hook is not None:
            answered = await self.hook(appends)
            if answered is not None:
                return list(answered)
        if self.enabled:
            if self.rng.random() < self.unavailable_p:
                await anyio.lowlevel.checkpoint()
                self.faults["unavailable"] += 1
                return [StoreUnavailable("sim: the store is down") for _ in appends]
            claimed = [a.job_id for a in appends
                       if any(isinstance(e, JobStarted) for e in a.events)]
            if claimed and self.rng.random() < self.race_p:
                await self.cancel_elsewhere(self.rng.choice(claimed))
        return await self.inner.append_batch(appends)

    async def cancel_elsewhere(self, job_id: str) -> None:
        """Another node's operator cancels the job, straight into the shared log."""
        job = await self.inner.get_job(job_id)
        if job is None or not job.is_active:
            return
        events = decide(job, CancelJob(job_id=job_id, at=self.clock.now(), actor="elsewhere"))
        await self.inner.append(job_id, events, job.version)
        self.faults["cancelled_elsewhere"] += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- files -------------------------------------------------------------------------------


def candidates(job: Job) -> list[str]:
    """Where the lifecycle may have left a job's file, most advanced first (as HotFolders)."""
    places = [layout.processing_path(job), layout.error_path(job), job.file_path]
    if job.finished_at is not None:
        places.insert(0, layout.archive_path(job, job.finished_at))
    return places


class SimFiles:
    """The Files port on a dict of paths, with HotFolders' moves and a disk's faults."""

    def __init__(self, rng: random.Random, *, refuse_p: float = 0.0, scanner_down_p: float = 0.0,
                 claim_error_p: float = 0.0, vanish_p: float = 0.0) -> None:
        self.rng = rng
        self.refuse_p, self.scanner_down_p = refuse_p, scanner_down_p
        self.claim_error_p, self.vanish_p = claim_error_p, vanish_p
        self.disk: dict[str, str] = {}  # data-root relative path -> the dropped file's tag
        self.reports: dict[str, tuple[str, str]] = {}  # error report -> (status, error type)
        self.vanished: set[str] = set()  # jobs whose file a user deleted
        self.odd: list[str] = []  # calls the port's docstring does not expect
        self.dropped = 0

    def drop(self, workflow_name: str, name: str) -> str:
        """A user drops a new file into input/; returns its tag."""
        path = layout.input_path(workflow_name, name)
        assert path not in self.disk, path
        self.dropped += 1
        self.disk[path] = f"file-{self.dropped}"
        return self.disk[path]

    def find(self, job: Job) -> str | None:
        return next((p for p in [job.current_path, *candidates(job)] if p in self.disk), None)

    async def intake(self, job: Job, config: WorkflowConfig,
                     processor: BaseProcessor) -> Refusal | None:
        await anyio.sleep(self.rng.uniform(0.0, 0.05))
        if self.rng.random() < self.scanner_down_p:
            raise ScannerUnavailable("sim: the scanner does not answer")
        if self.find(job) is None:
            return Refusal("FileMissing", f"{job.file_path} is not there any more")
        if self.rng.random() < self.refuse_p:
            return Refusal(self.rng.choice(REFUSALS), "sim: refused at intake")
        return None

    async def claim(self, job: Job) -> None:
        await anyio.lowlevel.checkpoint()  # a thread hop in the real adapter
        if job.status is not Status.RUNNING:
            self.odd.append(f"claim of {job.id} while {job.status}")
        if self.rng.random() < self.claim_error_p:
            raise OSError("sim: input/output error")
        if self.rng.random() < self.vanish_p:
            self.vanish(job)
        target = job.current_path
        if target in self.disk:
            return
        for source in candidates(job):
            if source != target and source in self.disk:
                self.disk[target] = self.disk.pop(source)
                self.reports.pop(source + ERROR_SUFFIX, None)
                return
        raise FileMissing(f"{job.file_path} is in none of input/, processing/, error/")

    def vanish(self, job: Job) -> None:
        """A user deletes the job's file wherever it lies."""
        place = self.find(job)
        if place is not None:
            del self.disk[place]
        self.vanished.add(job.id)

    async def settle(self, job: Job) -> None:
        await anyio.lowlevel.checkpoint()
        if job.is_active:
            self.odd.append(f"settle of {job.id} while {job.status}")
        target = job.current_path
        if target not in self.disk:
            source = next((p for p in candidates(job) if p != target and p in self.disk), None)
            if source is not None:
                self.disk[target] = self.disk.pop(source)
        if job.status in (Status.FAILED, Status.CANCELLED):
            error_type = job.error.type if job.error is not None else ""
            self.reports[target + ERROR_SUFFIX] = (str(job.status), error_type)

    async def reconcile(self, workflow_name: str, active: Sequence[Job], jobs: Any) -> None:
        """As HotFolders: settle what a crash left between a terminal event and its move.

        `jobs` is the port's JobLookup: a file in processing/ that no active job owns is
        settled like its finished job, or returned to input/; a file in input/ whose latest
        job was refused or cancelled before it started, and whose error/ copy does not
        exist, is settled too (the fake disk has no times: no file is dropped again).
        """
        lookup = jobs.get_job
        owned = {layout.stored_name(job) for job in active}
        prefix = f"{workflow_name}/processing/"
        strays = sorted(p for p in self.disk
                        if p.startswith(prefix) and p[len(prefix):] not in owned)
        for path in strays:
            name = path[len(prefix):]
            job = await lookup(name.partition("--")[0])
            if job is not None and not job.is_active:
                await self.settle(job)
                continue
            target = layout.input_path(workflow_name, name.partition("--")[2] or name)
            if target in self.disk:
                target = f"{workflow_name}/error/{name}"
            self.disk[target] = self.disk.pop(path)
        inbox = layout.input_path(workflow_name, "")
        waiting = sorted(p for p in self.disk if p.startswith(inbox)
                         and p not in {job.file_path for job in active})
        for latest in (await jobs.latest_jobs(workflow_name, waiting)).values():
            if latest.status in (Status.FAILED, Status.CANCELLED) and not latest.attempts \
                    and latest.current_path not in self.disk:
                await self.settle(latest)

    def context(self, job: Job, config: WorkflowConfig, progress: Callable[[float, str], None],
                cancelled: Callable[[], bool]) -> SimContext:
        return SimContext(job, self, progress, cancelled)


class SimContext:
    """The processor's view of its job, on the fake disk."""

    def __init__(self, job: Job, files: SimFiles, progress: Callable[[float, str], None],
                 cancelled: Callable[[], bool]) -> None:
        self._job, self._files = job, files
        self._progress, self._cancelled = progress, cancelled
        self._outputs: list[str] = []

    @property
    def job(self) -> Job:
        return self._job

    @property
    def input_path(self) -> Path:
        return Path(self._job.current_path)

    @property
    def output_dir(self) -> Path:
        return Path(layout.output_dir(self._job.workflow_name))

    @property
    def log(self) -> Any:
        return None

    @property
    def output_paths(self) -> list[str]:
        return list(self._outputs)

    @contextlib.contextmanager
    def open_output(self, name: str, mode: str = "wb") -> Iterator[IO[Any]]:
        buffer = io.BytesIO()
        yield buffer
        path = f"{layout.output_dir(self._job.workflow_name)}/{name}"
        self._files.disk[path] = f"output of {self._job.id}"
        self._outputs.append(path)

    def progress(self, fraction: float, message: str = "") -> None:
        self._progress(fraction, message)

    @property
    def cancelled(self) -> bool:
        return self._cancelled()

    def check_cancelled(self) -> None:
        if self._cancelled():
            raise JobCancelledError(f"job {self._job.id} was stopped")


# -- processors and their executor -------------------------------------------------------


class Tracker:
    """What processors really did: attempts, and how many ran at once (overall, per workflow)."""

    def __init__(self) -> None:
        self.live: Counter[str] = Counter()
        self.most_at_once = 0
        self.most_by_workflow: Counter[str] = Counter()
        self.runs: list[tuple[str, int, str]] = []  # (job id, attempt, behaviour)
        self.stopped: list[tuple[str, int]] = []  # attempts cancelled while they ran
        self.ended: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def running(self, job: Job) -> Iterator[None]:
        self.live[job.workflow_name] += 1
        self.most_at_once = max(self.most_at_once, self.live.total())
        wf = job.workflow_name
        self.most_by_workflow[wf] = max(self.most_by_workflow[wf], self.live[wf])
        try:
            yield
        except anyio.get_cancelled_exc_class():
            self.stopped.append((job.id, job.attempts))
            raise
        finally:
            self.live[job.workflow_name] -= 1
            self.ended.append((job.id, job.attempts))


BEHAVIOURS = ("ok", "ok", "ok", "output", "raise", "job_error", "final_error", "slow")


class SimProcessor(BaseProcessor):
    """Works in steps with progress, then succeeds, raises, or outlives its timeout."""

    def __init__(self, rng: random.Random, tracker: Tracker,
                 behaviours: Sequence[str] = BEHAVIOURS, step_s: tuple[float, float] = (0.05, 1.0),
                 steps: int = 3) -> None:
        self.rng, self.tracker = rng, tracker
        self.behaviours, self.step_s, self.steps = behaviours, step_s, steps

    async def process(self, ctx: JobContext, task: BaseTask) -> dict[str, Any]:
        job = ctx.job
        how = self.rng.choice(self.behaviours)
        self.tracker.runs.append((job.id, job.attempts, how))
        with self.tracker.running(job):
            for step in range(self.steps):
                await anyio.sleep(self.rng.uniform(*self.step_s))
                ctx.progress((step + 1) / (self.steps + 1), f"step {step + 1}")
            if how == "raise":
                raise ValueError("sim: the processor broke")
            if how == "job_error":
                raise JobError("Unreadable", "sim: a page could not be read")
            if how == "final_error":
                raise JobError("Corrupt", "sim: the file is corrupt", retryable=False)
            if how == "slow":
                await anyio.sleep(10_000)  # beyond any timeout_s: Timeout
            if how == "output":
                with ctx.open_output(f"{job.id}.txt") as handle:
                    handle.write(b"done")
            return {"how": how, "attempt": job.attempts}


class SimExecutor:
    """Runs async processors on the loop; cleanup may take a while (a thread hop, real work)."""

    def __init__(self, cleanup_s: float = 0.0) -> None:
        self.cleanup_s = cleanup_s
        self.cleanups: list[str] = []

    async def run(self, processor: BaseProcessor, ctx: JobContext, task: BaseTask,
                  runner: str) -> dict[str, Any]:
        result = processor.process(ctx, task)
        assert not isinstance(result, dict), "the simulation's processors are async"
        return await result

    async def cleanup(self, processor: BaseProcessor, ctx: JobContext) -> None:
        self.cleanups.append(ctx.job.id)
        if self.cleanup_s:
            await anyio.sleep(self.cleanup_s)


def by_job(log: Sequence[StoredEvent]) -> dict[str, list[StoredEvent]]:
    """The log split per job, in seq order."""
    jobs: dict[str, list[StoredEvent]] = defaultdict(list)
    for stored in log:
        jobs[stored.job_id].append(stored)
    return jobs
