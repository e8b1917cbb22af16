"""Intake checks files side by side: every intake worker takes part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters import Kernel
from adapters.files import HotFolders
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
        for i in range(16):
            (tmp_path / "w/input" / f"{i}.txt").write_bytes(b"x")
            await kernel.submit("w", f"{i}.txt")
        with anyio.fail_after(5):
            while len(list(kernel.manager.queue.jobs())) < 16:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert most == kernel.manager.intake_concurrency
