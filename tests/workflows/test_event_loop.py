"""A CPU-bound job in a worker thread never blocks the event loop: status reads stay fast."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

import workflows.compress as compress
import workflows.csv_summary as csv_summary
from adapters import Kernel
from kernel.state import Status

from .kit import drop, fast_config

pytestmark = pytest.mark.anyio

CALLS = 50
ANSWER_S_MAX = 1.0
PAUSE_S = 0.05


def big_csv(size_bytes: int) -> bytes:
    """A CSV of mixed columns, repeated blocks of 20k rows (the parse cost is what matters)."""
    rows = "".join(f"{i},{i % 997 / 7:.3f},city{i % 31},user{i * 7919 % 20_011}\n"
                   for i in range(20_000)).encode()
    return b"id,amount,city,user\n" + rows * (size_bytes // len(rows) + 1)


def random_bytes(size_bytes: int) -> bytes:
    """Incompressible bytes: level 9 works hardest on them."""
    return os.urandom(size_bytes)


CASES: list[tuple[ModuleType, str, Callable[[], bytes], dict[str, Any]]] = [
    (compress, "random.bin", lambda: random_bytes(192 * 2**20), {"level": 9}),  # GIL released
    (csv_summary, "big.csv", lambda: big_csv(96 * 2**20), {}),  # pure Python: GIL held
]


@pytest.mark.parametrize(("module", "name", "make", "params"), CASES,
                         ids=["compress-level-9", "csv_summary"])
async def test_status_reads_answer_within_a_second_while_a_cpu_bound_job_runs(
        tmp_path: Path, module: ModuleType, name: str, make: Callable[[], bytes],
        params: dict[str, Any]) -> None:
    """50 `get_job` calls made while the job runs each answer in under a second."""
    workflow = module.__name__.rsplit(".", 1)[-1]
    drop(tmp_path, workflow, name, make())
    async with Kernel.open(data_dir=tmp_path) as kernel:
        kernel.register_workflow(workflow, module.processor, config=fast_config(module))
        job = await kernel.submit(workflow, name, params=params)
        latencies_s = await _read_while_running(kernel, job.id)
        done = await kernel.wait(job.id, timeout_s=600)
    assert done.status is Status.COMPLETED, done.error
    assert len(latencies_s) >= CALLS, f"the job ended after {len(latencies_s)} reads"
    assert max(latencies_s) < ANSWER_S_MAX, sorted(latencies_s)[-5:]


async def _read_while_running(kernel: Kernel, job_id: str) -> list[float]:
    """Latencies of `get_job` calls made while the job runs, until CALLS of them or its end.

    A latency counts from when the call was due (the end of a 50 ms pause) to its answer,
    so a loop kept from running by the worker shows up as a late wake-up.
    """
    latencies_s: list[float] = []
    with anyio.fail_after(600):
        while len(latencies_s) < CALLS:
            due_s = time.perf_counter() + PAUSE_S
            await anyio.sleep(PAUSE_S)
            job = await kernel.get_job(job_id)
            answered_s = time.perf_counter() - due_s
            assert job is not None
            if job.status is Status.RUNNING:
                latencies_s.append(answered_s)
            elif not job.is_active:
                break
    return latencies_s
