"""End-to-end no-op jobs: created, started, completed, all durable; against huey.

multiflow: N files in input/, submitted with 256 in flight, run by a no-op
processor; the clock stops when the last JobCompleted is durable, as a client
following the log (SSE) sees it. Then, untimed, every job is waited for and every
input must lie in archive/ (the moves are checked, and how long after the last
completion they were done is printed).
huey (SqliteHuey, fsync=True), measured in the same run: N tasks enqueued, then
consumed by worker threads (dequeue + execute, what huey's consumer does).
Targets: concurrency 1 >= 1.0x huey with 1 worker; concurrency 8 >= 4x huey.

    .venv/bin/python -m tests.benchmarks.bench_e2e [--jobs 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from adapters import Kernel
from kernel.events import JobCompleted, JobFailed
from kernel.state import StoredEvent
from tests.benchmarks.common import NoOp, make_inputs, stopwatch, submit_all

SETTLE_LAGS_S: list[float] = []  # per run: last completion durable -> every input archived


async def multiflow_run(data_dir: Path, jobs: int, concurrency: int) -> float:
    names = make_inputs(data_dir, "bench", jobs)
    async with Kernel.open(data_dir=data_dir, concurrency=concurrency) as kernel:
        kernel.register_workflow("bench", NoOp())
        await kernel.ready("bench")
        ids: list[str] = []

        async def submit() -> None:
            ids.extend(await submit_all(kernel, "bench", names, 256))

        tail = kernel.store.tail(await kernel.store.last_seq())
        async with contextlib.aclosing(tail):
            with stopwatch() as elapsed:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(submit)
                    await completions(tail, jobs)
        done_s = time.perf_counter()
        for job_id in ids:
            await kernel.wait(job_id, timeout_s=600)
        SETTLE_LAGS_S.append(time.perf_counter() - done_s)
    archived = sum(1 for _ in (data_dir / "bench/archive").rglob("*--f*"))
    assert archived == jobs, f"{archived} of {jobs} inputs archived"
    return jobs / elapsed[0]


async def completions(tail: AsyncIterator[StoredEvent], count: int) -> list[str]:
    """Follow the log until `count` jobs have completed (durable: the tail shows commits);
    their ids."""
    done: list[str] = []
    async for stored in tail:
        if isinstance(stored.event, JobFailed):
            raise AssertionError(f"a no-op job failed: {stored.event.message}")
        if isinstance(stored.event, JobCompleted):
            done.append(stored.job_id)
            if len(done) == count:
                break
    return done


def huey_run(path: Path, jobs: int, workers: int) -> float:
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=str(path), fsync=True, results=False)

    @huey.task()
    def noop() -> None:
        return None

    with stopwatch() as elapsed:
        for _ in range(jobs):
            noop()
        threads = [threading.Thread(target=_consume, args=(huey,)) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return jobs / elapsed[0]


def _consume(huey: object) -> None:
    while (task := huey.dequeue()) is not None:  # type: ignore[attr-defined]
        huey.execute(task)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        huey_1 = huey_run(root / "huey1.db", args.jobs, 1)
        ours_1 = anyio.run(multiflow_run, root / "c1", args.jobs, 1)
        huey_8 = huey_run(root / "huey8.db", args.jobs, 8)
        ours_8 = anyio.run(multiflow_run, root / "c8", args.jobs, 8)
    print(f"huey SqliteHuey, 1 worker:  {huey_1:,.0f} jobs/s")
    print(f"multiflow, concurrency 1:   {ours_1:,.0f} jobs/s  "
          f"(ratio {ours_1 / huey_1:.2f}x; target >= 1.0x)")
    print(f"huey SqliteHuey, 8 workers: {huey_8:,.0f} jobs/s")
    print(f"multiflow, concurrency 8:   {ours_8:,.0f} jobs/s  "
          f"(ratio {ours_8 / huey_1:.2f}x huey-1, {ours_8 / huey_8:.2f}x huey-8; "
          f"target >= 4x huey)")
    print("every input archived after the last completion: "
          + ", ".join(f"{lag_s * 1000:.0f} ms" for lag_s in SETTLE_LAGS_S)
          + " (c=1, c=8; untimed, includes one wait() per job)")


if __name__ == "__main__":
    main()
