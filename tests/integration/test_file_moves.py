"""The order of a job's file moves against what must already be durable (real folders,
real SQLite): what a kill -9 or a power cut between two steps would leave."""

from __future__ import annotations

import errno
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import adapters.files
import adapters.fsutil
from adapters import Kernel
from adapters.files import ERROR_SUFFIX, HotFolders
from kernel.config import WorkflowConfig
from kernel.events import JobCancelled, JobCreated, JobStarted
from kernel.state import Status, evolve
from kernel.task import BaseProcessor, JobContext, JobError

pytestmark = pytest.mark.anyio


class Steps:
    """The order of folder fsyncs, file moves and processor calls, as they happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []
        real_move, real_fsync = adapters.files.move, adapters.fsutil.fsync_dir

        def move(source: str | Path, target: str | Path, **options: Any) -> None:
            report_there = Path(f"{target}{ERROR_SUFFIX}").exists()
            self.note("move", f"{Path(target).parent.name} report={report_there}")
            real_move(source, target, **options)

        def fsync_dir(path: str | Path) -> None:
            real_fsync(path)
            self.note("fsync", Path(path).name)

        monkeypatch.setattr(adapters.files, "move", move)
        monkeypatch.setattr(adapters.fsutil, "fsync_dir", fsync_dir)

    def note(self, kind: str, what: str) -> None:
        with self.lock:
            self.log.append((kind, what))


class Noting(BaseProcessor):
    """Notes when it runs; fails (for good) when asked to."""

    def __init__(self, steps: Steps, fail: bool) -> None:
        self.steps, self.fail = steps, fail

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.steps.note("process", ctx.input_path.parent.name)
        if self.fail:
            raise JobError("Broken", "this file cannot be processed", retryable=False)
        return {}


async def run_one(tmp_path: Path, steps: Steps, *, fail: bool) -> Status:
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("moves", Noting(steps, fail), config=WorkflowConfig())
        await kernel.ready("moves")
        (tmp_path / "moves/input/a.txt").write_bytes(b"a")
        job = await kernel.submit("moves", "a.txt")
        return (await kernel.wait(job.id, timeout_s=10)).status


async def test_the_claims_move_is_durable_before_the_processor_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """input/ -> processing/, then the fsync of processing/, and only then the processor:
    a completed job's file cannot come back to input/ after a power cut."""
    steps = Steps(monkeypatch)
    assert await run_one(tmp_path, steps, fail=False) is Status.COMPLETED
    claimed = steps.log.index(("move", "processing report=False"))
    processed = steps.log.index(("process", "processing"))
    assert ("fsync", "processing") in steps.log[claimed:processed]


async def test_a_failed_jobs_report_is_in_error_before_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error report is written before the file moves to error/, so a crash between
    the two leaves the file where reconciliation settles it again, never a file in
    error/ without its report."""
    steps = Steps(monkeypatch)
    assert await run_one(tmp_path, steps, fail=True) is Status.FAILED
    assert ("move", "error report=True") in steps.log
    assert ("move", "error report=False") not in steps.log
    reports = list((tmp_path / "moves/error").glob(f"*{ERROR_SUFFIX}"))
    assert len(reports) == 1


async def test_a_jobs_file_is_claimed_from_the_disk_once_per_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager moves a file while its claim commits; the attempt's own claim then
    returns without another pass over the disk (nor a thread hop)."""
    passes: list[str] = []
    real_claim = adapters.files.HotFolders._claim

    def counting_claim(self: adapters.files.HotFolders, job: Any, dirty: set[str]) -> None:
        passes.append(job.id)
        real_claim(self, job, dirty)

    monkeypatch.setattr(adapters.files.HotFolders, "_claim", counting_claim)
    steps = Steps(monkeypatch)
    assert await run_one(tmp_path, steps, fail=False) is Status.COMPLETED
    assert len(passes) == 1


async def test_a_settled_job_is_claimed_from_the_disk_again(tmp_path: Path) -> None:
    """Settling forgets a job's claim: claiming the same attempt again looks for the file
    where the settle left it (here: brought back from error/)."""
    files = adapters.files.HotFolders(tmp_path)
    files.ensure_layout("moves")
    (tmp_path / "moves/input/a.txt").write_bytes(b"a")
    now = datetime.now(UTC)
    created = evolve(None, JobCreated(job_id="J1", at=now, workflow_name="moves",
                                      file_path="moves/input/a.txt"))
    running = evolve(created, JobStarted(job_id="J1", at=now, attempt=1))
    await files.claim(running)
    await files.settle(evolve(running, JobCancelled(job_id="J1", at=now, actor="test")))
    assert (tmp_path / "moves/error/J1--a.txt").exists()
    await files.claim(running)
    assert (tmp_path / "moves/processing/J1--a.txt").exists()


async def test_a_rejected_file_is_never_in_error_without_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file refused before it became a job (an escaping symlink) gets its report in
    error/ before it moves there: a crash (or ENOSPC) writing the report leaves the file
    in input/, never a file in error/ that says nothing about why."""
    folders = HotFolders(tmp_path / "data")
    folders.ensure_layout("hot")
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"x")
    os.symlink(outside, tmp_path / "data" / "hot" / "input" / "link.txt")

    def crash(target: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (or: the process died here)")

    monkeypatch.setattr(adapters.files, "write_bytes_atomic", crash)
    with pytest.raises(OSError):
        await folders.reject("hot", "link.txt", "resolves outside input/", datetime.now(UTC))
    error_dir = tmp_path / "data" / "hot" / "error"
    in_error = sorted(p.name for p in error_dir.iterdir())
    reports = [n for n in in_error if n.endswith(".error.json")]
    files = [n for n in in_error if not n.endswith(".error.json")]
    assert not files or reports, f"error/ holds {files} with no report beside it"
