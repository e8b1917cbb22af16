"""Helpers shared by the benchmarks: temp data dirs, input files, no-op workflows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from adapters import Kernel
from kernel.task import BaseProcessor, JobContext


class NoOp(BaseProcessor):
    """Does nothing, on the event loop: what is left is the system's own cost."""

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return {}


def make_inputs(data_dir: Path, workflow: str, count: int, size_bytes: int = 64) -> list[str]:
    """`count` small files in the workflow's input/ folder; their names."""
    inbox = data_dir / workflow / "input"
    inbox.mkdir(parents=True, exist_ok=True)
    names = [f"f{i:06d}.dat" for i in range(count)]
    payload = b"x" * size_bytes
    for name in names:
        (inbox / name).write_bytes(payload)
    return names


async def submit_all(kernel: Kernel, workflow: str, names: list[str], in_flight: int) -> list[str]:
    """Submit every name with `in_flight` submits outstanding; the job ids, in order."""
    ids: list[str] = [""] * len(names)

    async def worker(offset: int) -> None:
        for i in range(offset, len(names), in_flight):
            ids[i] = (await kernel.submit(workflow, names[i])).id

    async with anyio.create_task_group() as tg:
        for offset in range(in_flight):
            tg.start_soon(worker, offset)
    return ids


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds once the block ends."""
    box = [0.0]
    started = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - started
