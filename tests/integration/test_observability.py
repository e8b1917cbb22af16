"""Logs and metrics are projections of the event log: they say what the jobs did."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from prometheus_client import generate_latest

from adapters import Kernel
from adapters.logs import configure_logging
from adapters.memory import MemoryEventStore
from adapters.metrics import Metrics
from adapters.observe import Observer
from kernel.config import WorkflowConfig
from kernel.events import JobCancelled, JobCompleted, JobCreated, JobStarted
from kernel.task import BaseProcessor, JobContext


class Echo(BaseProcessor):
    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        if ctx.input_path.read_bytes() == b"bad":
            raise ValueError("bad input")
        return {"ok": True}


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    """Per-workflow log files in a temp folder, with a tiny rotation size."""
    folder = tmp_path / "logs"
    files = configure_logging("info", "json", log_dir=folder, file_max_bytes=2000,
                              file_backups=2)
    yield folder
    if files is not None:
        files.close()
    structlog.reset_defaults()


async def run_jobs(data: Path, contents: list[bytes]) -> tuple[Kernel, list[str]]:
    ids: list[str] = []
    async with Kernel.open(data_dir=data) as kernel:
        kernel.register_workflow("echo", Echo(), config=WorkflowConfig(max_attempts=1))
        for i, content in enumerate(contents):
            (data / "echo/input" / f"{i}.txt").write_bytes(content)
            ids.append((await kernel.submit("echo", f"{i}.txt")).id)
        for job_id in ids:
            await kernel.wait(job_id, timeout_s=10)
        assert kernel.observer is not None
        with anyio.fail_after(10):
            while kernel.observer.last_seq < await kernel.store.last_seq():  # noqa: ASYNC110
                await anyio.sleep(0.01)  # the observer follows the log on its own task
        metrics = generate_latest(kernel.metrics.registry).decode()  # type: ignore[union-attr]
    return kernel, [metrics, *ids]


@pytest.mark.anyio
async def test_a_jobs_lines_carry_its_id_and_the_workflow_file_rotates(
    tmp_path: Path, log_dir: Path
) -> None:
    """Each job's lines name it; echo.log rotates at its size limit and keeps its backups."""
    _, (_, *ids) = await run_jobs(tmp_path / "data", [b"fine"] * 30)
    files = sorted(p.name for p in log_dir.iterdir())
    assert files == ["echo.log", "echo.log.1", "echo.log.2"]
    lines = [json.loads(line) for name in files for line in (log_dir / name).read_text()
             .splitlines()]
    assert all(line["workflow_name"] == "echo" for line in lines)
    finished = [line for line in lines if line["event"] == "job_finished"]
    assert finished and all(line["job_id"] in ids for line in finished)
    canonical = finished[-1]
    assert {"status", "duration_s", "wait_s", "attempts", "error_type"} <= set(canonical)


@pytest.mark.anyio
async def test_metrics_match_what_happened(tmp_path: Path) -> None:
    """3 completed and 1 failed jobs show up as such in /metrics' text."""
    _, (metrics, *_) = await run_jobs(tmp_path / "data", [b"a", b"b", b"bad", b"c"])
    assert 'multiflow_jobs_finished_total{status="completed",workflow="echo"} 3.0' in metrics
    assert 'multiflow_jobs_finished_total{status="failed",workflow="echo"} 1.0' in metrics
    assert 'multiflow_job_failures_total{error_type="ValueError",workflow="echo"} 1.0' in metrics
    assert 'multiflow_jobs{status="completed",workflow="echo"} 3.0' in metrics
    assert 'multiflow_jobs{status="pending",workflow="echo"} 0.0' in metrics
    assert 'multiflow_intake_total{outcome="accepted",reason="",workflow="echo"} 4.0' in metrics
    assert 'multiflow_job_duration_seconds_count{workflow="echo"} 4.0' in metrics
    assert "multiflow_log_events 12.0" in metrics
    assert "process_resident_memory_bytes" in metrics
    assert "multiflow_log_append_seconds_count" in metrics


@pytest.mark.anyio
@pytest.mark.parametrize("level", ["debug", "info"])
async def test_debug_lines_of_each_event_only_at_debug_level(tmp_path: Path, level: str) -> None:
    """job_created and job_started are logged at debug level, and only there; the metrics
    those events move are counted at any level."""
    files = configure_logging(level, "json", log_dir=tmp_path / "logs")
    try:
        _, (metrics, job_id) = await run_jobs(tmp_path / "data", [b"fine"])
    finally:
        if files is not None:
            files.close()
        structlog.reset_defaults()
    lines = [json.loads(line) for line in (tmp_path / "logs/echo.log").read_text().splitlines()]
    events = [line["event"] for line in lines if line.get("job_id") == job_id]
    if level == "debug":
        assert events[:2] == ["job_created", "job_started"]
    else:
        assert events == ["job_finished"]
    assert 'multiflow_intake_total{outcome="accepted",reason="",workflow="echo"} 1.0' in metrics
    assert 'multiflow_job_wait_seconds_count{workflow="echo"} 1.0' in metrics


@pytest.mark.anyio
@pytest.mark.parametrize(("node", "lines_of"), [
    ("node-a", {"mine", "never-started"}),
    (None, {"mine", "other", "never-started"}),
])
async def test_in_a_cluster_a_jobs_lines_are_written_by_the_node_that_ran_it(
    node: str | None, lines_of: set[str]
) -> None:
    """Every node follows every event: a node writes the lines of the jobs it ran (and of
    jobs no node ran), so a cluster writes each job's lines once; one node writes all.
    The metrics count every event either way."""
    store = MemoryEventStore()
    observer = Observer(store, Metrics(), node=node)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    runs = {"mine": "node-a", "other": "node-b", "never-started": None}
    for job_id, worker in runs.items():
        events: list[Any] = [JobCreated(job_id=job_id, at=at, workflow_name="w",
                                        file_path=f"w/input/{job_id}.txt")]
        if worker is not None:
            events += [JobStarted(job_id=job_id, at=at, attempt=1, worker=worker),
                       JobCompleted(job_id=job_id, at=at, attempt=1)]
        else:
            events.append(JobCancelled(job_id=job_id, at=at, actor="api"))
        await store.append(job_id, events, 0)
    structlog.reset_defaults()  # whatever level an earlier test configured
    try:
        with structlog.testing.capture_logs() as lines:
            for stored in await store.read_all():
                await observer.observe(stored)
    finally:
        structlog.reset_defaults()
    assert {line["job_id"] for line in lines if line["event"] == "job_finished"} == lines_of
    finished = observer.metrics.finished.labels("w", "completed")._value.get()
    assert finished == 2
