"""Pending jobs held in memory give the cyclic garbage collector nothing new to walk:
a full pass over a big backlog would stall every request for tens of milliseconds."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters import Kernel
from kernel.config import WorkflowConfig
from kernel.task import BaseProcessor, JobContext

pytestmark = pytest.mark.anyio


class NoOp(BaseProcessor):
    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return {}


async def submit_burst(kernel: Kernel, names: list[str]) -> None:
    """Submit these files at once and wait until every job is queued."""
    queued = len(list(kernel.manager.queue.jobs()))
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(kernel.submit, "w", name)
    with anyio.fail_after(10):
        while len(list(kernel.manager.queue.jobs())) < queued + len(names):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def tracked_when_quiet() -> int:
    """The objects the collector tracks once the burst's own tasks, timers and lane
    operations have wound down (on a loaded machine some are still in flight when the
    last job is queued; they are not the backlog's)."""
    counts = []
    for _ in range(3):
        await anyio.sleep(0.1)
        gc.collect()
        counts.append(len(gc.get_objects()))
    return min(counts)


async def test_a_backlog_of_pending_jobs_adds_almost_no_tracked_objects(tmp_path: Path) -> None:
    """After a first burst (the tasks, caches and timers a running kernel keeps), 2,000
    more pending jobs, each held by the store, the manager and the observer, add fewer
    than one object the collector tracks per 10 jobs (three lists a job, and the last
    group of appends, before)."""
    inbox = tmp_path / "w/input"
    names = [f"{i}.txt" for i in range(2500)]
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow("w", NoOp(), config=WorkflowConfig(enabled=False))
        await kernel.ready("w")
        for name in names:
            (inbox / name).write_bytes(b"x")
        await submit_burst(kernel, names[:500])
        before = await tracked_when_quiet()
        await submit_burst(kernel, names[500:])
        grown = await tracked_when_quiet() - before
    assert grown < 2000 / 10, f"{grown} more tracked objects for 2,000 more pending jobs"
