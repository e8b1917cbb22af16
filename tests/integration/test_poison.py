"""A poison file that kills the whole process ends in error/ after its attempts.

The other files complete, each exactly once.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.bootstrap import Kernel
from adapters.sqlite import SqliteEventStore
from kernel.config import WorkflowConfig
from kernel.decide import CreateJob, StartJob, decide
from kernel.state import Job, Status, apply
from tests.integration.crash_child import WORKFLOW, CrashProcessor, input_bytes
from tests.integration.crashkit import (
    Audit,
    all_names,
    assert_attempts_consistent,
    assert_completed_job,
    assert_every_file_once,
    assert_folders,
    assert_log_sound,
    child_command,
    finish,
    start_child,
    tail,
)

FILES = 20
MAX_ATTEMPTS = 3
POISON = "f00007.dat"
LIVES_MAX = 10
LIFE_TIMEOUT_S = 30.0
POISON_EXIT_CODE = 1  # crash_child's processor calls os._exit(1)
WAIT_S = 3.0


@pytest.mark.anyio
async def test_poison_file_fails_finally_as_interrupted_after_max_attempts_deaths(
    tmp_path: Path,
) -> None:
    """A file whose processor kills the process dies max_attempts times, then lands in
    error/ failed as Interrupted while every other file completes."""
    data_dir, log = tmp_path / "data", tmp_path / "child.log"
    command = child_command(data_dir, FILES, concurrency=1, max_attempts=MAX_ATTEMPTS,
                            backoff_s=0.01, poison=POISON)
    deaths, code = 0, None
    for _ in range(LIVES_MAX):
        code = await finish(await start_child(command, log), LIFE_TIMEOUT_S)
        if code != POISON_EXIT_CODE:
            break
        deaths += 1
    assert code == 0, f"the last life exited {code}\n{tail(log)}"
    assert deaths == MAX_ATTEMPTS, f"{deaths} deaths\n{tail(log)}"
    assert "Traceback" not in log.read_text(errors="replace"), tail(log, 200)

    audit = await Audit.load(data_dir)
    names = all_names(FILES)
    others = [name for name in names if name != POISON]
    assert_log_sound(audit)
    assert_every_file_once(audit, names)
    for name in others:
        assert_completed_job(audit, name)
    poison = audit.job_of(POISON)
    assert poison.status is Status.FAILED
    assert poison.error is not None and poison.error.type == "Interrupted"
    assert poison.attempts == MAX_ATTEMPTS
    assert audit.types_of(poison.id)["JobStarted"] == MAX_ATTEMPTS
    assert_attempts_consistent(audit, poison)
    assert_folders(audit, completed=others, failed=[POISON])
    resting = data_dir / poison.current_path
    assert resting.parent.name == "error" and resting.read_bytes() == input_bytes(7)
    report = json.loads(resting.with_name(resting.name + ".error.json").read_bytes())
    assert (report["status"], report["error_type"], report["attempts"]) == (
        "failed", "Interrupted", MAX_ATTEMPTS)


async def killed_mid_attempt(data_dir: Path, *, moved: bool) -> Path:
    """The state a kill -9 leaves during attempt 1 of job J1: JobStarted durable, file
    still in input/ (`moved=False`: killed before the claim's rename) or in processing/."""
    name = f"{WORKFLOW}/input/{POISON}"
    at = datetime.now(UTC)
    store = await SqliteEventStore.open(data_dir / "multiflow.db")
    try:
        (stored,) = await store.append(
            "J1", decide(None, CreateJob(job_id="J1", at=at, workflow_name=WORKFLOW,
                                         file_path=name)), 0)
        job = apply(None, stored)
        (started,) = await store.append(
            "J1", decide(job, StartJob(job_id="J1", at=at)), job.version)
        job = apply(job, started)
    finally:
        await store.close()
    path = data_dir / (job.current_path if moved else name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(input_bytes(7))
    return path


async def recover_last_attempt(data_dir: Path, *, wait: bool) -> Job | None:
    """Open the kernel on the killed state with max_attempts=1; job J1 once recovered
    (`wait=False`: as the log has it when recovery is over) or finished (`wait=True`)."""
    async with Kernel.open(data_dir=data_dir) as kernel:
        kernel.register_workflow(WORKFLOW, CrashProcessor(None),
                                 config=WorkflowConfig(max_attempts=1))
        await kernel.ready(WORKFLOW)  # recovery's own file moves are done by now
        if wait:
            return await kernel.wait("J1", timeout_s=WAIT_S)
        return await kernel.store.get_job("J1")


@pytest.mark.anyio
async def test_wait_returns_for_a_job_failed_finally_at_recovery(tmp_path: Path) -> None:
    """kernel.wait returns the job that recovery failed finally as Interrupted (its file was
    in processing/, where a crashing processor leaves it)."""
    data_dir = tmp_path / "data"
    await killed_mid_attempt(data_dir, moved=True)
    job = await recover_last_attempt(data_dir, wait=True)
    assert job is not None and job.status is Status.FAILED
    assert job.error is not None and job.error.type == "Interrupted"
    assert (data_dir / job.current_path).read_bytes() == input_bytes(7)


@pytest.mark.anyio
async def test_last_attempt_killed_before_its_file_moved_still_ends_in_error(
    tmp_path: Path,
) -> None:
    """A job killed on its last attempt after JobStarted was durable but before its file
    left input/ ends finally failed with its file in error/."""
    data_dir = tmp_path / "data"
    left_in = await killed_mid_attempt(data_dir, moved=False)
    job = await recover_last_attempt(data_dir, wait=False)
    assert job is not None and job.status is Status.FAILED
    assert job.error is not None and job.error.type == "Interrupted"
    assert not left_in.exists(), "the finally failed job's file stayed in input/"
    resting = data_dir / job.current_path
    assert resting.read_bytes() == input_bytes(7)
    assert resting.with_name(resting.name + ".error.json").is_file()
