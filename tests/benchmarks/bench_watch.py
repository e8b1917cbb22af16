"""Hot-folder latency and throughput, with the bare watchfiles floor measured in the same run.

- close of a renamed-in file -> its JobCreated durable, settle 0: p50 <= 50 ms
  (bare watchfiles with debounce=50, step=10: ~16 ms p50); default settle: <= settle + 50 ms
- a burst of 1,000 renamed-in files: all jobs durable within 1.5 s of the last close
- 10,000 files through a no-op workflow at concurrency 8, all archived: >= 1,000 files/s

    .venv/bin/python -m tests.benchmarks.bench_watch [--samples 40] [--files 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import watchfiles

from adapters import Kernel
from kernel.config import WorkflowConfig
from kernel.events import JobCreated
from tests.benchmarks.bench_e2e import completions, following
from tests.benchmarks.common import NoOp


def drop(staging: Path, inbox: Path, name: str) -> float:
    """Write a file outside input/, rename it in; the time of the rename."""
    (staging / name).write_bytes(b"x" * 1024)
    at = time.perf_counter()
    os.rename(staging / name, inbox / name)
    return at


async def bare_floor(root: Path, samples: int) -> list[float]:
    """Latency from rename to watchfiles' notification, with nothing else running."""
    inbox, staging = root / "bare", root / "bare-staging"
    inbox.mkdir()
    staging.mkdir()
    latencies: list[float] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        seen = anyio.Event()
        arrived: list[float] = []

        async def follow() -> None:
            async for _ in watchfiles.awatch(inbox, debounce=50, step=10, stop_event=stop):
                arrived.append(time.perf_counter())
                seen.set()

        tg.start_soon(follow)
        await anyio.sleep(0.3)
        for i in range(samples):
            seen = anyio.Event()
            arrived.clear()
            at = drop(staging, inbox, f"f{i}")
            with anyio.fail_after(5):
                await seen.wait()
            latencies.append(arrived[0] - at)
            await anyio.sleep(0.05)
        stop.set()
    return latencies


async def created_latency(root: Path, samples: int, settle_ms: int) -> list[float]:
    """Latency from rename to JobCreated durable (seen on the log's tail)."""
    data, staging = root / f"data-{settle_ms}", root / f"staging-{settle_ms}"
    staging.mkdir()
    latencies: list[float] = []
    config = WorkflowConfig(settle_ms=settle_ms, enabled=False)
    async with Kernel.open(data_dir=data, drain_grace_s=0) as kernel:
        kernel.register_workflow("bench", NoOp(), config=config)
        await kernel.start_watchers()
        inbox = data / "bench/input"
        after = await kernel.store.last_seq()
        tail = kernel.store.tail(after)
        for i in range(samples):
            at = drop(staging, inbox, f"f{i}")
            with anyio.fail_after(10):
                while not isinstance((await anext(tail)).event, JobCreated):
                    pass
            latencies.append(time.perf_counter() - at)
            await anyio.sleep(0.05)
    return latencies


async def burst(root: Path, count: int) -> float:
    """Seconds from the last rename of a burst to the last of its JobCreated being durable."""
    data, staging = root / "burst", root / "burst-staging"
    staging.mkdir()
    config = WorkflowConfig(settle_ms=0, enabled=False)
    async with Kernel.open(data_dir=data, drain_grace_s=0) as kernel:
        kernel.register_workflow("bench", NoOp(), config=config)
        await kernel.start_watchers()
        inbox = data / "bench/input"
        for i in range(count):
            (staging / f"f{i}").write_bytes(b"x")
        for i in range(count):
            os.rename(staging / f"f{i}", inbox / f"f{i}")
        last_close = time.perf_counter()
        with anyio.fail_after(60):
            while sum((await kernel.store.count_jobs()).values()) < count:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        return time.perf_counter() - last_close


async def throughput(root: Path, count: int, concurrency: int) -> float:
    """Files/s from dropping `count` files to every one's JobCompleted being durable (as a
    client following the log sees it); every input must then lie in archive/."""
    data, staging = root / "through", root / "through-staging"
    staging.mkdir()
    for i in range(count):
        (staging / f"f{i}").write_bytes(b"x" * 256)
    config = WorkflowConfig(settle_ms=0)
    async with Kernel.open(data_dir=data, concurrency=concurrency) as kernel:
        kernel.register_workflow("bench", NoOp(), config=config)
        await kernel.start_watchers()
        inbox = data / "bench/input"
        tail = following(kernel, await kernel.store.last_seq())
        async with contextlib.aclosing(tail):
            started = time.perf_counter()
            for i in range(count):
                os.rename(staging / f"f{i}", inbox / f"f{i}")
            with anyio.fail_after(600):
                done = await completions(tail, count)
            elapsed = time.perf_counter() - started
        for job_id in done:
            await kernel.wait(job_id, timeout_s=60)  # its file moved, too
    archived = sum(1 for _ in (data / "bench/archive").rglob("*--f*"))
    assert archived == count, f"{archived} of {count} archived"
    return count / elapsed


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        floor = anyio.run(bare_floor, root, args.samples)
        zero = anyio.run(created_latency, root, args.samples, 0)
        default = anyio.run(created_latency, root, max(10, args.samples // 4), 500)
        burst_s = anyio.run(burst, root, 1000)
        rate = anyio.run(throughput, root, args.files, 8)
    print(f"bare watchfiles (debounce=50, step=10): p50 {p50_ms(floor):.1f} ms")
    print(f"close -> JobCreated durable, settle 0:   p50 {p50_ms(zero):.1f} ms "
          f"(target <= 50; {p50_ms(zero) / p50_ms(floor):.1f}x the floor)")
    print(f"close -> JobCreated durable, settle 500: p50 {p50_ms(default):.1f} ms "
          f"(target <= 550)")
    print(f"burst of 1,000: last job durable {burst_s * 1000:.0f} ms after the last close "
          f"(target <= 1500)")
    print(f"{args.files:,} files through a no-op workflow at concurrency 8: {rate:,.0f} files/s "
          f"(target >= 1,000)")


if __name__ == "__main__":
    main()
