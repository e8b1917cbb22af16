"""PostgreSQL goes away under a running node, and comes back (the seed's "database
connection issues"): the node stops claiming, /readyz answers 503, it reconnects, and
every job completes exactly once."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e.serverkit import Server, free_port, launch
from tests.integration.pgkit import PrivatePostgres

JOBS = 40


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(free_port())
    try:
        server.init()
        server.start()
        yield server
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()  # (the test may have stopped it)
    finally:
        server.remove()


def completed_per_job(url: str) -> Counter[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT job_id FROM mf.events WHERE type = 'job.completed'").fetchall()
    return Counter(row[0] for row in rows)


def ready(server: Server) -> int:
    with server.anonymous() as client:
        return client.get("/readyz").status_code


def test_the_node_survives_a_database_restart(postgres: PrivatePostgres, tmp_path: Path) -> None:
    server = launch(tmp_path / "node", store=f"{postgres.url}?schema=mf", watchers="false",
                    lease_s="4", heartbeat_s="0.5")
    try:
        inbox = server.input_dir("slow")
        inbox.mkdir(parents=True, exist_ok=True)
        ids = []
        with server.client() as client:
            for i in range(JOBS):
                (inbox / f"f{i:03d}.txt").write_text(str(i))
                made = client.post("/api/slow/process", json={
                    "file_path": f"f{i:03d}.txt", "seconds": 0.1})
                assert made.status_code == 201, made.text
                ids.append(made.json()["id"])
        time.sleep(0.5)  # some jobs done, the rest queued, one running
        assert ready(server) == 200
        postgres.stop()
        deadline = time.monotonic() + 20
        while ready(server) != 503:
            assert time.monotonic() < deadline, "/readyz kept answering 200 without a database"
            time.sleep(0.1)
        time.sleep(2)  # jobs finish meanwhile and cannot be recorded: they must wait
        postgres.start()
        deadline = time.monotonic() + 60
        while ready(server) != 200:
            assert time.monotonic() < deadline, server.log_text()[-4000:]
            time.sleep(0.1)
        for job_id in ids:
            job = server.wait_job(job_id, timeout_s=60)
            assert job["status"] == "completed", job
        counts = completed_per_job(postgres.url)
        assert all(counts[job_id] == 1 for job_id in ids), counts
        assert len(list((server.data_dir / "slow" / "archive").rglob("*--f*.txt"))) == JOBS
    except BaseException:
        print(server.log_text()[-6000:])  # the node's side of the story
        raise
    finally:
        server.stop(timeout_s=30)
