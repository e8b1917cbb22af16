"""Intake checks files side by side: every intake worker takes part."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters import Kernel
from adapters.files import SCANS_AT_ONCE, HotFolders
from kernel.config import WorkflowConfig
from kernel.ports import Refusal
from kernel.state import Job
from kernel.task import BaseProcessor, JobContext

pytestmark = pytest.mark.anyio


class NoOp(BaseProcessor):
    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return {}


async def test_the_intake_workers_check_files_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a burst of new jobs, as many intake checks run at once as there are workers
    (a worker that found the queue empty once must not be left waiting for ever)."""
    in_flight, most = 0, 0

    async def slow_intake(self: HotFolders, job: Job, config: WorkflowConfig,
                          processor: BaseProcessor) -> Refusal | None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await anyio.sleep(0.02)
        in_flight -= 1
        return None

    monkeypatch.setattr(HotFolders, "intake", slow_intake)
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("w", NoOp(), config=WorkflowConfig(enabled=False))
        await kernel.ready("w")
        await anyio.sleep(0.05)  # every worker has found the queue empty by now
        burst = 2 * kernel.manager.intake_concurrency
        for i in range(burst):
            (tmp_path / "w/input" / f"{i}.txt").write_bytes(b"x")
        async with anyio.create_task_group() as tg:  # one burst: their appends share a commit
            for i in range(burst):
                tg.start_soon(kernel.submit, "w", f"{i}.txt")
        with anyio.fail_after(5):
            while len(list(kernel.manager.queue.jobs())) < burst:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert most == kernel.manager.intake_concurrency


async def test_at_most_a_few_intake_checks_wait_on_the_scanner_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks with a virus scan each take a thread and a scanner connection: however many
    intake workers there are, SCANS_AT_ONCE of them scan at a time; the others wait."""
    lock = threading.Lock()
    in_flight, most = 0, 0

    def slow_scan(self: HotFolders, job: Any, config: WorkflowConfig,
                  processor: BaseProcessor) -> Refusal | None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.02)
        with lock:
            in_flight -= 1
        return None

    monkeypatch.setattr(HotFolders, "_intake", slow_scan)
    files = HotFolders(tmp_path)
    config = WorkflowConfig(scan=True)
    async with anyio.create_task_group() as tg:
        for _ in range(3 * SCANS_AT_ONCE):
            tg.start_soon(files.intake, None, config, NoOp())
    assert most == SCANS_AT_ONCE
