"""Three node processes on one PostgreSQL log, 2,000 jobs, one node SIGKILLed mid-run.

Every job completes exactly once, the cluster-wide limit was never exceeded (replayed
from the log), the jobs of the killed node were recovered by the others after its
lease expired, and the hash chain verifies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from adapters.audit import verify_chain
from adapters.postgres import PostgresEventStore
from kernel.events import JobCompleted, JobCreated, JobFailed, JobStarted
from kernel.ports import Append
from kernel.state import StoredEvent
from tests.integration.pgkit import fresh_schema, store_url
from tests.integration.test_cluster import most_running

pytestmark = pytest.mark.anyio
NODE = Path(__file__).with_name("cluster_node.py")
JOBS = 2000
LIMIT = 4  # cluster-wide; three nodes of 2 could run 6


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async for name in fresh_schema("mf_kill"):
        yield name


def start_node(url: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(NODE), url, str(data_dir), "--node-concurrency", "2",
             "--concurrency", str(LIMIT), "--sleep-ms", "5"],
            stdout=out, stderr=subprocess.STDOUT)


async def create_jobs(store: PostgresEventStore, data_dir: Path) -> list[str]:
    inbox = data_dir / "wf" / "input"
    inbox.mkdir(parents=True, exist_ok=True)
    ids = []
    appends = []
    for i in range(JOBS):
        name = f"f{i:05d}.txt"
        (inbox / name).write_text(f"{i}\n")
        job_id = f"01KILLTEST{i:016d}"
        ids.append(job_id)
        appends.append(Append(job_id, [JobCreated(job_id=job_id, at=datetime.now(UTC),
                                                  workflow_name="wf",
                                                  file_path=f"wf/input/{name}")], 0))
    for start in range(0, JOBS, 500):
        results = await store.append_batch(appends[start : start + 500])
        assert all(isinstance(r, list) for r in results), results[:3]
    return ids


async def completed(store: PostgresEventStore) -> int:
    return sum(n for (_, status), n in (await store.count_jobs()).items() if status == "completed")


async def whole_log(store: PostgresEventStore) -> list[StoredEvent]:
    events: list[StoredEvent] = []
    while batch := await store.read_all(events[-1].seq if events else 0, 5000):
        events += batch
    return events


async def test_a_node_killed_mid_run_loses_and_repeats_nothing(schema: str, tmp_path: Path
                                                               ) -> None:
    url = store_url(schema)
    store = await PostgresEventStore.open(url, node_id="test")
    log = tmp_path / "nodes.log"
    nodes = [start_node(url, tmp_path, log) for _ in range(3)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 3:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert all(n.poll() is None for n in nodes), log.read_text()[-3000:]
            await anyio.sleep(0.1)
        ids = await create_jobs(store, tmp_path)
        while await completed(store) < JOBS // 3:
            assert time.monotonic() < deadline + 120, log.read_text()[-3000:]
            await anyio.sleep(0.05)
        victim = nodes[1]
        victim_id = (tmp_path / f"ready-{victim.pid}").read_text()
        while not [j for j in await store.running_jobs() if j.worker == victim_id]:
            assert time.monotonic() < deadline + 120, "the victim never ran a job"
        os.kill(victim.pid, signal.SIGKILL)  # while it holds a job
        victim.wait()
        killed_at = time.monotonic()
        while await completed(store) < JOBS:
            assert time.monotonic() < killed_at + 180, log.read_text()[-3000:]
            assert nodes[0].poll() is None and nodes[2].poll() is None, log.read_text()[-3000:]
            await anyio.sleep(0.1)
        # The killed node's finished jobs whose files it had not moved yet are moved by
        # the others once its lease has expired.
        while list((tmp_path / "wf" / "processing").iterdir()):
            assert time.monotonic() < killed_at + 60, \
                list((tmp_path / "wf" / "processing").iterdir())
            await anyio.sleep(0.1)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
    events = await whole_log(store)
    report = await verify_chain(store)
    await store.close()

    types = Counter((s.job_id, type(s.event).__name__) for s in events)
    assert all(types[(job_id, "JobCompleted")] == 1 for job_id in ids)
    assert sum(1 for s in events if isinstance(s.event, JobCompleted)) == JOBS
    assert most_running(events) <= LIMIT
    assert most_running(events) == LIMIT  # the limit was reached, so it was tested
    workers = Counter(s.event.worker for s in events if isinstance(s.event, JobStarted))
    assert len(workers) == 3, workers
    interrupted = [s for s in events if isinstance(s.event, JobFailed)
                   and s.event.error_type == "Interrupted"]
    assert interrupted, "the killed node held no job: the test proved nothing"
    assert report.first_bad_seq is None and report.checked == len(events), report
    outputs = list((tmp_path / "wf" / "output").rglob("*.out"))
    assert len({p.name for p in outputs}) == JOBS
    assert not list((tmp_path / "wf" / "input").iterdir())
    assert not list((tmp_path / "wf" / "processing").iterdir())
