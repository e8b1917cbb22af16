"""End-to-end no-op jobs: created, started, completed, all durable; against huey.

multiflow: N files in input/, submitted with 256 in flight, run by a no-op
processor; the clock stops when the last JobCompleted is durable, as a client
following the log (SSE) sees it. Then, untimed, every job is waited for and every
input must lie in archive/ (the moves are checked, and how long after the last
completion they were done is printed).
huey (SqliteHuey, fsync=True), measured in the same run: N tasks enqueued, then
consumed by worker threads (dequeue + execute, what huey's consumer does).
Targets: concurrency 1 >= 1.0x huey with 1 worker; concurrency 8 >= 4x huey.

    .venv/bin/python -m tests.benchmarks.bench_e2e [--jobs 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
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

        tail = following(kernel, await kernel.store.last_seq())
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


async def following(kernel: Kernel, after: int) -> AsyncGenerator[StoredEvent, None]:
    """The log after `after`, as a client following it sees each committed event."""
    async for stored in kernel.store.tail(after):
        yield stored


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


def one_round(jobs: int) -> tuple[float, float, float, float]:
    """huey with 1 worker, multiflow at concurrency 1, huey with 8, multiflow at 8."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        huey_1 = huey_run(root / "huey1.db", jobs, 1)
        ours_1 = anyio.run(multiflow_run, root / "c1", jobs, 1)
        huey_8 = huey_run(root / "huey8.db", jobs, 8)
        ours_8 = anyio.run(multiflow_run, root / "c8", jobs, 8)
    return huey_1, ours_1, huey_8, ours_8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = []
    for number in range(1, args.rounds + 1):
        huey_1, ours_1, huey_8, ours_8 = one_round(args.jobs)
        rounds.append((huey_1, ours_1, huey_8, ours_8))
        print(f"round {number}: huey-1 {huey_1:,.0f}, multiflow c=1 {ours_1:,.0f} "
              f"({ours_1 / huey_1:.2f}x); huey-8 {huey_8:,.0f}, multiflow c=8 {ours_8:,.0f} "
              f"({ours_8 / huey_1:.2f}x huey-1, {ours_8 / huey_8:.2f}x huey-8) jobs/s")
    huey_1, ours_1, huey_8, ours_8 = (statistics.median(r[i] for r in rounds) for i in range(4))
    ratio_1 = statistics.median(r[1] / r[0] for r in rounds)
    ratio_8 = statistics.median(r[3] / r[0] for r in rounds)
    ratio_8_8 = statistics.median(r[3] / r[2] for r in rounds)
    print(f"medians of {len(rounds)} rounds of {args.jobs:,} jobs (ratios: the median of the "
          "rounds' own ratios)")
    print(f"huey SqliteHuey, 1 worker:  {huey_1:,.0f} jobs/s")
    print(f"multiflow, concurrency 1:   {ours_1:,.0f} jobs/s  "
          f"(ratio {ratio_1:.2f}x; target >= 1.0x)")
    print(f"huey SqliteHuey, 8 workers: {huey_8:,.0f} jobs/s")
    print(f"multiflow, concurrency 8:   {ours_8:,.0f} jobs/s  "
          f"(ratio {ratio_8:.2f}x huey-1, {ratio_8_8:.2f}x huey-8; target >= 4x huey)")
    lags_ms = sorted(lag_s * 1000 for lag_s in SETTLE_LAGS_S)
    print(f"every input archived after the last completion: median "
          f"{statistics.median(lags_ms):.0f} ms, at most {lags_ms[-1]:.0f} ms "
          "(untimed; includes one wait() per job)")


if __name__ == "__main__":
    main()
