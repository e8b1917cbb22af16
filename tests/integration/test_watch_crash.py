"""kill -9 of the watching process while files stream into its hot folder.

The parent drops files into `stream/input/` (renamed in, or written in place in
two halves) while a child (watch_child.py: Kernel.open, register_workflow,
start_watchers) turns them into jobs; the parent SIGKILLs the child at seeded
random moments and starts it again, then lets the last life finish. The audit
reads the log read-only after the child has exited, folds it with
`kernel.state.replay` (the independent oracle) and checks the folders.

The seed is printed; set MULTIFLOW_WATCH_CRASH_SEED to replay a schedule (the
moments are times, so a replay is close to, not exactly, the same run).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import anyio.abc
import pytest

from adapters import Kernel
from adapters.fsutil import TEMP_SUFFIX
from adapters.sqlite import SqliteEventStore
from kernel.config import WorkflowConfig
from kernel.events import Event, JobCancelled, JobCompleted, JobCreated, JobFailed
from kernel.state import Job, Status, StoredEvent, replay
from kernel.task import BaseProcessor, JobContext
from tests.integration import watch_child
from tests.integration.watch_child import (
    BAD_PREFIX,
    SETTLE_MS,
    WORKFLOW,
    input_bytes,
    input_name,
    output_bytes,
    output_name,
)

CHILD = Path(watch_child.__file__).resolve()
ROOT = CHILD.parents[2]
SEED = int(os.environ.get("MULTIFLOW_WATCH_CRASH_SEED") or secrets.randbits(32))
FILES = 240
KILLS = 7
READY_TIMEOUT_S = 20.0
LAST_LIFE_TIMEOUT_S = 40.0


# -- the parent's side: dropping files, starting and killing lives -------------------------


def drop_one(index: int, inbox: Path, staging: Path, rng: random.Random) -> None:
    """Drop one file: renamed in whole, or written in place in two halves."""
    name, data = input_name(index), input_bytes(index)
    if rng.random() < 0.6:
        (staging / name).write_bytes(data)
        os.rename(staging / name, inbox / name)
        return
    half = len(data) // 2
    with open(inbox / name, "wb") as handle:
        handle.write(data[:half])
        handle.flush()
        time.sleep(SETTLE_MS / 1000 / 5)  # a writer's pause, well under settle_ms
        handle.write(data[half:])


async def drop_stream(inbox: Path, staging: Path, state_dir: Path, rng: random.Random) -> None:
    """Drop FILES files at an uneven pace, then say how many there were."""
    for index in range(FILES):
        await anyio.to_thread.run_sync(drop_one, index, inbox, staging, rng)
        await anyio.sleep(rng.uniform(0.0, 0.05))
    await anyio.Path(state_dir / "dropped").write_text(str(FILES))


async def start_life(data_dir: Path, state_dir: Path, log_path: Path) -> anyio.abc.Process:
    """Start one life of the child; its output goes to `log_path` (one file for all lives)."""
    command = [sys.executable, str(CHILD), str(data_dir), str(state_dir)]
    with open(log_path, "ab") as log:
        return await anyio.open_process(command, stdin=None, stdout=log, stderr=log, cwd=ROOT)


async def kill_at_random(process: anyio.abc.Process, state_dir: Path,
                         rng: random.Random) -> bool:
    """SIGKILL the life at a random moment (in start-up and recovery, or while it watches);
    False if it exited on its own first."""
    ready = anyio.Path(state_dir / f"ready-{process.pid}")
    if rng.random() < 0.3:
        await anyio.sleep(rng.uniform(0.05, 0.6))  # often still starting or recovering
    else:
        with anyio.fail_after(READY_TIMEOUT_S):
            while not await ready.exists() and process.returncode is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(rng.uniform(0.0, 1.0))
    killed = process.returncode is None
    if killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    with anyio.fail_after(10):
        code = await process.wait()
    await process.aclose()
    return killed and code == -signal.SIGKILL


async def finish(process: anyio.abc.Process, timeout_s: float) -> int:
    """Let the last life run to its end; its exit code."""
    try:
        with anyio.fail_after(timeout_s):
            return await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()


def tail(log_path: Path, lines: int = 40) -> str:
    """The end of the child's log, for assertion messages."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# -- the audit -----------------------------------------------------------------------------


async def read_log(data_dir: Path) -> list[StoredEvent]:
    """Every stored event, from the log opened read-only after the child exited."""
    store = await SqliteEventStore.open(data_dir / "multiflow.db", readonly=True)
    try:
        events: list[StoredEvent] = []
        while page := await store.read_all(events[-1].seq if events else 0, 5000):
            events += page
    finally:
        await store.close()
    return events


def is_terminal(event: Event) -> bool:
    """Completed, finally failed, or cancelled."""
    if isinstance(event, JobFailed):
        return event.retry_at is None
    return isinstance(event, JobCompleted | JobCancelled)


def stage_files(data_dir: Path, stage: str) -> list[Path]:
    """Every file under one stage folder (subfolders and hidden files too)."""
    root = data_dir / WORKFLOW / stage
    return sorted(Path(d) / f for d, _, names in os.walk(root) for f in names)


def assert_one_job_per_file(jobs: dict[str, Job], names: list[str]) -> dict[str, Job]:
    """Every dropped file has exactly one job, and no job names another file."""
    per_name = Counter(job.file_path.rpartition("/")[2] for job in jobs.values())
    assert sorted(per_name) == sorted(names), "jobs lost, or made for files never dropped"
    twice = {name: n for name, n in per_name.items() if n != 1}
    assert not twice, f"files with more than one job: {twice}"
    return {job.file_path.rpartition("/")[2]: job for job in jobs.values()}


def assert_each_job_ended_once(events: list[StoredEvent], jobs: dict[str, Job]) -> None:
    """Every job has exactly one JobCreated and exactly one terminal event, the last one."""
    by_job: dict[str, list[Event]] = {}
    for stored in events:
        by_job.setdefault(stored.job_id, []).append(stored.event)
    for job_id, mine in by_job.items():
        assert sum(isinstance(e, JobCreated) for e in mine) == 1, job_id
        terminal = [e for e in mine if is_terminal(e)]
        assert len(terminal) == 1, f"{job_id}: {len(terminal)} terminal events"
        ended = len(mine) - 1 - mine[::-1].index(terminal[0])
        assert all(type(e).__name__ == "JobDuplicateReceived" for e in mine[ended + 1:])
        assert not jobs[job_id].is_active


def assert_folders(data_dir: Path, by_name: dict[str, Job]) -> None:
    """input/ and processing/ are empty; each input lies once in archive/ or error/, whole;
    each good input has its complete output; no temporary file is left anywhere."""
    good = sorted(n for n in by_name if not n.startswith(BAD_PREFIX))
    bad = sorted(n for n in by_name if n.startswith(BAD_PREFIX))
    assert stage_files(data_dir, "input") == []
    assert stage_files(data_dir, "processing") == []
    archived = Counter(p.name.partition("--")[2] for p in stage_files(data_dir, "archive"))
    assert archived == Counter(good), "archive/ holds missing or repeated inputs"
    errors = Counter(p.name.partition("--")[2] for p in stage_files(data_dir, "error"))
    assert errors == Counter([*bad, *(f"{n}.error.json" for n in bad)])
    outputs = [p.name for p in stage_files(data_dir, "output")]
    assert sorted(outputs) == sorted(output_name(n) for n in good)
    for name, job in by_name.items():
        index = int(name[-9:-4])
        assert (data_dir / job.current_path).read_bytes() == input_bytes(index), name
        if name in good:
            output = data_dir / WORKFLOW / "output" / output_name(name)
            assert output.read_bytes() == output_bytes(input_bytes(index)), f"{name}: torn"
            assert job.output_paths == (output.relative_to(data_dir).as_posix(),)
    temporaries = [p for p in data_dir.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert temporaries == []


@pytest.mark.slow
@pytest.mark.anyio
async def test_kill9_while_files_stream_in_loses_none_and_ends_each_job_once(
    tmp_path: Path,
) -> None:
    """SIGKILLed at random moments while files stream into input/, the watching process still
    makes one job per file, ends each exactly once, leaves complete outputs and clean folders."""
    print(f"watch crash seed: {SEED} (MULTIFLOW_WATCH_CRASH_SEED={SEED} to replay)")
    rng = random.Random(SEED)
    drop_rng = random.Random(rng.getrandbits(64))
    data_dir, state_dir, staging = tmp_path / "data", tmp_path / "state", tmp_path / "staging"
    inbox = data_dir / WORKFLOW / "input"
    for folder in (inbox, state_dir, staging):
        folder.mkdir(parents=True)
    log_path = tmp_path / "child.log"
    kills = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(drop_stream, inbox, staging, state_dir, drop_rng)
        for _ in range(KILLS):
            process = await start_life(data_dir, state_dir, log_path)
            kills += await kill_at_random(process, state_dir, rng)
    process = await start_life(data_dir, state_dir, log_path)
    code = await finish(process, LAST_LIFE_TIMEOUT_S)
    assert code == 0, f"seed {SEED}: the last life exited {code}\n{tail(log_path)}"
    assert kills >= 5, f"seed {SEED}: only {kills} kills landed"
    log_text = log_path.read_text(errors="replace")
    assert "watcher_failed" not in log_text, tail(log_path, 200)

    events = await read_log(data_dir)
    jobs = replay(events)
    names = [input_name(index) for index in range(FILES)]
    by_name = assert_one_job_per_file(jobs, names)
    assert_each_job_ended_once(events, jobs)
    for name, job in by_name.items():
        expected = Status.FAILED if name.startswith(BAD_PREFIX) else Status.COMPLETED
        assert job.status is expected, f"seed {SEED}: {name} is {job.status} ({job.error})"
    assert_folders(data_dir, by_name)
    interrupted = sum(1 for e in events if isinstance(e.event, JobFailed)
                      and e.event.error_type == "Interrupted")
    print(f"{kills} kills, {interrupted} attempts interrupted, {len(events)} events")


# -- a crash between a terminal event and the move of the file, made deterministic ----------


class Noop(BaseProcessor):
    """Does nothing."""

    async def process(self, ctx: JobContext, task: object) -> dict[str, object]:
        return {}


@pytest.mark.anyio
async def test_a_cancelled_file_left_in_input_by_a_crash_is_not_processed_at_restart(
    tmp_path: Path,
) -> None:
    """A crash after a pending job's JobCancelled but before its file left input/ does not let
    the watcher make a new job of that file at the next start."""
    data_dir = tmp_path / "data"
    inbox = data_dir / WORKFLOW / "input"
    inbox.mkdir(parents=True)
    (inbox / "cancel-me.txt").write_bytes(b"the user said no\n")
    held = WorkflowConfig(enabled=False)  # nothing starts: the job stays pending
    async with Kernel.open(data_dir=data_dir) as kernel:
        kernel.register_workflow(WORKFLOW, Noop(), config=held)
        job = await kernel.submit(WORKFLOW, "cancel-me.txt")
        cancelled = await kernel.cancel(job.id, actor="test", reason="not wanted")
    assert cancelled.status is Status.CANCELLED
    # What a SIGKILL between the durable JobCancelled and the move leaves on disk:
    moved = data_dir / cancelled.current_path
    shutil.move(moved, inbox / "cancel-me.txt")
    moved.with_name(moved.name + ".error.json").unlink()

    async with Kernel.open(data_dir=data_dir) as kernel:
        kernel.register_workflow(WORKFLOW, Noop(), config=WorkflowConfig(settle_ms=0))
        with anyio.fail_after(10):
            await kernel.start_watchers()
            (inbox / "sentinel.txt").write_bytes(b"look at input/ now\n")
            while not await _created_for(kernel, "sentinel.txt"):  # noqa: ASYNC110 (the log)
                await anyio.sleep(0.02)
        await anyio.sleep(0.5)
        again = await _created_for(kernel, "cancel-me.txt")
        watch_child.wake_watchfiles(inbox)
    assert [event.job_id for event in again] == [job.id], "the cancelled file became a new job"
    assert not (inbox / "cancel-me.txt").exists()


async def _created_for(kernel: Kernel, name: str) -> list[JobCreated]:
    path = f"{WORKFLOW}/input/{name}"
    found: list[JobCreated] = []
    after = 0
    while page := await kernel.events(after, 5000):
        found += [e.event for e in page
                  if isinstance(e.event, JobCreated) and e.event.file_path == path]
        after = page[-1].seq
    return found
