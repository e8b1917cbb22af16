"""Several nodes on one PostgreSQL log: scaling from 1 to 3 nodes, and the start latency.

1. Throughput: node processes (tests/integration/cluster_node.py) whose processor sleeps
   20 ms, each with concurrency 4 and no cluster-wide limit; N jobs appended to the log
   at once, timed until all are completed. 1 node, then 3 nodes, in the same run.
   Target: 3 nodes >= 2.4x 1 node. Each throughput run also reports the CPU seconds per
   job of the node processes together and of the PostgreSQL backends serving them (when
   the server runs on this machine).
2. Start latency: an idle cluster of 3 nodes (this process is one of them); a job
   submitted to this node, timed from `submit` until its processor starts. Target: p50
   <= 10 ms (procrastinate, woken by LISTEN/NOTIFY: ~5 ms).

    .venv/bin/python -m tests.benchmarks.bench_cluster [--jobs 1500] [--rounds 1]
                                                       [--no-latency]

With several rounds, 1 and 3 nodes alternate and the medians (and the median of the
rounds' own ratios) are reported.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg

from adapters import Kernel
from adapters.postgres import PostgresEventStore
from kernel.events import JobCreated
from kernel.ports import Append
from kernel.task import BaseProcessor, JobContext

SERVER = os.environ.get("MULTIFLOW_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
NODE = Path(os.environ.get("MULTIFLOW_BENCH_NODE", "")
            or Path(__file__).resolve().parents[1] / "integration" / "cluster_node.py")


def fresh_database(name: str) -> str:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{SERVER}/{name}?schema=bench"


def start_nodes(url: str, data_dir: Path, count: int, sleep_ms: float) -> list[Any]:
    nodes = []
    with (data_dir / "nodes.log").open("ab") as log:
        for _ in range(count):
            nodes.append(subprocess.Popen(
                [sys.executable, str(NODE), url, str(data_dir), "--node-concurrency", "4",
                 "--concurrency", "0", "--sleep-ms", str(sleep_ms), "--lease-s", "15",
                 "--heartbeat-s", "3", "--no-output"], stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while len(list(data_dir.glob("ready-*"))) < count:
        if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
            raise SystemExit((data_dir / "nodes.log").read_text()[-3000:])
        time.sleep(0.05)
    return nodes


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids() -> list[int]:
    """The PostgreSQL server's processes on this machine (empty if it runs elsewhere)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


async def backends(store: PostgresEventStore) -> list[int]:
    """The server processes of this store's database."""
    rows = await store._fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return [row[0] for row in rows]


def cpu_of(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def stop_nodes(nodes: list[Any]) -> None:
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    for node in nodes:
        node.wait(60)


class Run:
    """One throughput run: jobs/s, and CPU seconds per job of the nodes and the server."""

    def __init__(self, rate: float, nodes_cpu: float, server_cpu: float, jobs: int) -> None:
        self.rate = rate
        self.nodes_us = nodes_cpu / jobs * 1e6
        self.server_us = server_cpu / jobs * 1e6

    def __str__(self) -> str:
        return (f"{self.rate:,.0f} jobs/s; CPU per job: nodes {self.nodes_us:,.0f} us, "
                f"PostgreSQL {self.server_us:,.0f} us")


async def throughput(nodes_count: int, jobs: int) -> Run:
    url = fresh_database("mf_bench_cluster")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        inbox = data_dir / "wf" / "input"
        inbox.mkdir(parents=True)
        names = [f"f{i:05d}.txt" for i in range(jobs)]
        for name in names:
            (inbox / name).write_text(name)
        store = await PostgresEventStore.open(url, node_id="bench")
        nodes = start_nodes(url, data_dir, nodes_count, 20)
        try:
            now = datetime.now(UTC)
            appends = [Append(f"01BENCH{i:019d}", [JobCreated(
                job_id=f"01BENCH{i:019d}", at=now, workflow_name="wf",
                file_path=f"wf/input/{name}")], 0) for i, name in enumerate(names)]
            node_cpu = cpu_of([n.pid for n in nodes])
            pg_cpu = cpu_of(server_pids())
            started = time.perf_counter()
            await store.append_batch(appends)
            while True:
                counts = await store.count_jobs()
                if counts.get(("wf", "completed"), 0) >= jobs:
                    break
                await anyio.sleep(0.02)
            elapsed = time.perf_counter() - started
            nodes_cpu = sum(cpu_seconds(pid) - cpu for pid, cpu in node_cpu.items())
            # This database's backends (other users' work on the server is not ours); one
            # opened during the run counts whole, one that ended is lost.
            server_cpu = sum(cpu - pg_cpu.get(pid, 0.0)
                             for pid, cpu in cpu_of(await backends(store)).items())
        finally:
            stop_nodes(nodes)
            await store.close()
    return Run(jobs / elapsed, nodes_cpu, server_cpu, jobs)


class Stamp(BaseProcessor):
    """Records when each job's processor starts."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        self.started[ctx.job.id] = time.perf_counter()
        return {}


async def start_latency(samples: int) -> list[float]:
    url = fresh_database("mf_bench_latency")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        inbox = data_dir / "wf" / "input"
        inbox.mkdir(parents=True)
        nodes = start_nodes(url, data_dir, 2, 0)
        stamp = Stamp()
        waits: list[float] = []
        try:
            store = await PostgresEventStore.open(url)
            async with Kernel.open(store, data_dir, concurrency=None, node_concurrency=4,
                                   lease_s=15, heartbeat_s=3) as kernel:
                kernel.register_workflow("wf", stamp)
                await kernel.ready("wf")
                await anyio.sleep(0.5)
                for i in range(samples):
                    name = f"lat{i:04d}.txt"
                    (inbox / name).write_text(name)
                    before = time.perf_counter()
                    job = await kernel.submit("wf", name)
                    done = await kernel.wait(job.id, timeout_s=30)
                    if job.id in stamp.started:
                        waits.append(stamp.started[job.id] - before)
                    else:  # another node ran it: its start time is in the log
                        assert done.started_at is not None
                        waits.append((done.started_at - job.created_at).total_seconds())
                    await anyio.sleep(0.05)  # idle again
        finally:
            stop_nodes(nodes)
    return waits


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    ones: list[float] = []
    threes: list[float] = []
    ratios: list[float] = []
    for _ in range(args.rounds):
        one = await throughput(1, args.jobs)
        print(f"1 node  (concurrency 4, 20 ms jobs): {one}", flush=True)
        three = await throughput(3, args.jobs)
        print(f"3 nodes (concurrency 4 each):        {three} "
              f"(ratio {three.rate / one.rate:.2f}x; target >= 2.4x)", flush=True)
        ones.append(one.rate)
        threes.append(three.rate)
        ratios.append(three.rate / one.rate)
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds: 1 node {statistics.median(ones):,.0f} jobs/s, "
              f"3 nodes {statistics.median(threes):,.0f} jobs/s, ratio "
              f"{statistics.median(ratios):.2f}x", flush=True)
    if args.no_latency:
        return
    waits = sorted(await start_latency(args.samples))
    print(f"start latency on an idle cluster of 3: p50 {statistics.median(waits) * 1000:.1f} ms, "
          f"p90 {waits[int(len(waits) * 0.9)] * 1000:.1f} ms (target p50 <= 10 ms)")


if __name__ == "__main__":
    anyio.run(main)
