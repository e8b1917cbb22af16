"""A poison file that kills the whole process ends in error/ after its attempts; the rest complete."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.bootstrap import Kernel
from adapters.sqlite import SqliteEventStore
from kernel.config import WorkflowConfig
from kernel.decide import CreateJob, StartJob, decide
from kernel.state import Status
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


@pytest.mark.anyio
async def test_poison_file_fails_finally_as_interrupted_after_max_attempts_deaths(
    tmp_path: Path,
) -> None:
    """A file whose processor kills the process dies max_attempts times, then lands in error/ as Interrupted while every other file completes."""
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


@pytest.mark.xfail(strict=True, reason="bug: recover() settles only jobs still active after "
                   "it failed them, so a last attempt killed before its claim rename leaves "
                   "the file in input/ (kernel/manager.py recover/_terminal_unsettled)")
@pytest.mark.anyio
async def test_last_attempt_killed_before_its_file_moved_still_ends_in_error(
    tmp_path: Path,
) -> None:
    """A job killed on its last attempt after JobStarted was durable but before its file left input/ ends finally failed with its file in error/."""
    data_dir = tmp_path / "data"
    inbox = data_dir / WORKFLOW / "input"
    inbox.mkdir(parents=True)
    (inbox / POISON).write_bytes(input_bytes(7))
    # The state a kill -9 leaves between the claim's commit and the rename to processing/.
    at = datetime.now(UTC)
    created = decide(None, CreateJob(job_id="J1", at=at, workflow_name=WORKFLOW,
                                     file_path=f"{WORKFLOW}/input/{POISON}"))
    store = await SqliteEventStore.open(data_dir / "multiflow.db")
    try:
        (stored,) = await store.append("J1", created, 0)
        job = await store.get_job("J1")
        assert job is not None
        await store.append("J1", decide(job, StartJob(job_id="J1", at=at)), job.version)
    finally:
        await store.close()

    async with Kernel.open(data_dir=data_dir) as kernel:
        kernel.register_workflow(WORKFLOW, CrashProcessor(None),
                                 config=WorkflowConfig(max_attempts=1))
        await kernel.ready(WORKFLOW)
        job = await kernel.get_job("J1")

    assert job is not None and job.status is Status.FAILED
    assert job.error is not None and job.error.type == "Interrupted"
    assert not (inbox / POISON).exists(), "the finally failed job's file stayed in input/"
    resting = data_dir / job.current_path
    assert resting.read_bytes() == input_bytes(7)
    assert resting.with_name(resting.name + ".error.json").is_file()
