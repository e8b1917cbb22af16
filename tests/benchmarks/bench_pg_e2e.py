"""No-op jobs end to end on PostgreSQL, one node, against procrastinate (one worker).

Both against the same server, measured in the same run: N jobs submitted (256 in flight)
and run to the end. multiflow: created, started, completed, all durable, the input file
moved to archive/. procrastinate: deferred, fetched, run, marked succeeded (it keeps
the rows). Target: multiflow >= 2x procrastinate.

    .venv/bin/python -m tests.benchmarks.bench_pg_e2e [--jobs 2000] [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import anyio
import psycopg

from adapters import Kernel
from adapters.postgres import PostgresEventStore
from tests.benchmarks.common import NoOp, make_inputs, stopwatch, submit_all

SERVER = os.environ.get("MULTIFLOW_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def fresh_database(name: str) -> str:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{SERVER}/{name}"


async def multiflow_run(url: str, data_dir: Path, jobs: int) -> float:
    names = make_inputs(data_dir, "bench", jobs)
    store = await PostgresEventStore.open(f"{url}?schema=bench")
    async with Kernel.open(store, data_dir) as kernel:
        kernel.register_workflow("bench", NoOp())
        await kernel.ready("bench")
        with stopwatch() as elapsed:
            ids = await submit_all(kernel, "bench", names, 256)
            for job_id in ids:
                await kernel.wait(job_id, timeout_s=600)
    return jobs / elapsed[0]


async def procrastinate_run(url: str, jobs: int) -> float:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        with stopwatch() as elapsed:
            for start in range(0, jobs, 256):
                await asyncio.gather(*(noop.defer_async()
                                       for _ in range(min(256, jobs - start))))
            await app.run_worker_async(concurrency=1, wait=False, install_signal_handlers=False)
    return jobs / elapsed[0]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            ours.append(await multiflow_run(fresh_database("mf_bench"), Path(tmp), args.jobs))
        theirs.append(await procrastinate_run(fresh_database("mf_bench_procrastinate"),
                                              args.jobs))
        print(f"round: multiflow {ours[-1]:,.0f} jobs/s, procrastinate {theirs[-1]:,.0f} jobs/s",
              flush=True)
    best_ours, best_theirs = sorted(ours)[len(ours) // 2], sorted(theirs)[len(theirs) // 2]
    print(f"procrastinate, one worker:      {best_theirs:,.0f} jobs/s (median)")
    print(f"multiflow on PostgreSQL, 1 node: {best_ours:,.0f} jobs/s (median; ratio "
          f"{best_ours / best_theirs:.2f}x; target >= 2x)")


if __name__ == "__main__":
    anyio.run(main)
