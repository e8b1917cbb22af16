"""Durable submits through the kernel API: 20,000 jobs, 256 submits in flight.

Target: >= 20,000 jobs/s. References measured in the same run: SQLite with one
durable commit per row (what a store that awaits per append can do) and one
`executemany` of the same row count (the ceiling of batching). Each round runs the
kernel and then the references; the medians of the rounds are the figures.

    .venv/bin/python -m tests.benchmarks.bench_submit [--jobs 20000] [--in-flight 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from adapters import Kernel
from kernel.config import WorkflowConfig
from tests.benchmarks.common import NoOp, make_inputs, stopwatch, submit_all


async def kernel_submits(data_dir: Path, jobs: int, in_flight: int) -> float:
    names = make_inputs(data_dir, "bench", jobs)
    async with Kernel.open(data_dir=data_dir, drain_grace_s=0) as kernel:
        # Disabled: jobs are created and queued but not run, so only submits are timed.
        kernel.register_workflow("bench", NoOp(), config=WorkflowConfig(enabled=False))
        await kernel.ready("bench")
        with stopwatch() as elapsed:
            await submit_all(kernel, "bench", names, in_flight)
    return jobs / elapsed[0]


def sqlite_reference(path: Path, rows: int) -> tuple[float, float]:
    """(rows/s committing each row, rows/s in one executemany), WAL + synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
    payload = "x" * 300
    sample = min(rows, 2000)
    started = time.perf_counter()
    for _ in range(sample):
        conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
    per_row = sample / (time.perf_counter() - started)
    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t (payload) VALUES (?)", [(payload,)] * rows)
    conn.execute("COMMIT")
    batched = rows / (time.perf_counter() - started)
    conn.close()
    return per_row, batched


def one_round(jobs: int, in_flight: int) -> tuple[float, float, float]:
    """(kernel jobs/s, reference rows/s per commit, reference rows/s executemany)."""
    with tempfile.TemporaryDirectory() as tmp:
        rate = anyio.run(kernel_submits, Path(tmp) / "data", jobs, in_flight)
        per_row, batched = sqlite_reference(Path(tmp) / "ref.db", jobs)
    return rate, per_row, batched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = []
    for number in range(1, args.rounds + 1):
        rate, per_row, batched = one_round(args.jobs, args.in_flight)
        rounds.append((rate, per_row, batched))
        print(f"round {number}: kernel {rate:,.0f} jobs/s; one commit per row {per_row:,.0f} "
              f"rows/s; one executemany {batched:,.0f} rows/s ({rate / batched:.3f}x)")
    rate, per_row, batched = (statistics.median(r[i] for r in rounds) for i in range(3))
    ratio = statistics.median(r[0] / r[2] for r in rounds)
    print(f"kernel submits: {rate:,.0f} jobs/s, median of {len(rounds)} rounds "
          f"({args.jobs:,} jobs, {args.in_flight} in flight; target >= 20,000)")
    print(f"reference, sqlite one commit per row: {per_row:,.0f} rows/s "
          f"(ratio {rate / per_row:.1f}x)")
    print(f"reference, sqlite one executemany: {batched:,.0f} rows/s "
          f"(median ratio of the rounds {ratio:.3f}x)")


if __name__ == "__main__":
    main()
