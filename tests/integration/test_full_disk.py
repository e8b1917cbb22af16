"""A full disk under the SQLite log: StoreFull, nothing half-written, and a clean resume.

The log lives on a 2 MB tmpfs mounted for the test (root only; skipped where
mounting is not permitted); the hot folders stay on the ordinary disk, so only
the store runs out of space.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters.bootstrap import Kernel
from adapters.sqlite import SqliteEventStore
from kernel import chain
from kernel.config import WorkflowConfig
from kernel.decide import CreateJob, StartJob, decide
from kernel.events import Event, JobCompleted, JobCreated
from kernel.ports import Append, StoreFull
from kernel.state import Status, StoredEvent, replay
from kernel.task import BaseProcessor, JobContext
from tests.integration.crashkit import integrity_check

WORKFLOW = "disk"
DISK_SIZE = "2m"
CHUNK_BYTES = 64 * 1024
PARAMS_BYTES = 8 * 1024  # big enough that an append needs fresh pages of the WAL
WAIT_S = 15.0
RESUME_S = 5.0  # once space is back, the next retry lands within about a second


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not installed")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk refuses one more byte; the filler's path."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * CHUNK_BYTES, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler


def created(job_id: str, name: str) -> list[Event]:
    """A JobCreated with a bulky params payload, for `name` in the workflow's input/."""
    return decide(None, CreateJob(
        job_id=job_id, at=datetime.now(UTC), workflow_name=WORKFLOW,
        file_path=f"{WORKFLOW}/input/{name}", params={"note": "x" * PARAMS_BYTES}))


async def read_log(store: SqliteEventStore) -> list[StoredEvent]:
    """The whole log, in seq order."""
    return await store.read_all(0, 10**9)


async def assert_consistent(store: SqliteEventStore) -> list[StoredEvent]:
    """The chain verifies, seqs are gapless, and the read model equals the replayed log."""
    events = await read_log(store)
    report = chain.verify(await store.read_chain(0, 10**9))
    assert report.ok, f"chain broken at seq {report.first_bad_seq}: {report.reason}"
    assert report.checked == len(events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    replayed = replay(events)
    for job_id, job in replayed.items():
        assert await store.get_job(job_id) == job, f"read model of {job_id} differs from replay"
    assert sum((await store.count_jobs()).values()) == len(replayed)
    return events


@pytest.mark.anyio
async def test_append_on_a_full_disk_raises_store_full_and_leaves_nothing_half_written(
    small_disk: Path,
) -> None:
    """An append on a full disk raises StoreFull naming the disk and writes no event or row,
    and appends resume gaplessly once space is freed."""
    db = small_disk / "multiflow.db"
    store = await SqliteEventStore.open(db)
    try:
        for i in range(5):
            await store.append(f"A{i}", created(f"A{i}", f"a{i}.dat"), 0)
        job = await store.get_job("A0")
        assert job is not None
        await store.append("A0", decide(job, StartJob(job_id="A0", at=datetime.now(UTC))), 1)
        before = await assert_consistent(store)

        filler = fill(small_disk)
        with pytest.raises(StoreFull, match="full") as caught:
            await store.append("F1", created("F1", "f1.dat"), 0)
        assert str(db.parent) in str(caught.value), "the message should name where the disk is"
        batch = await store.append_batch([Append(f"F{i}", created(f"F{i}", f"f{i}.dat"), 0)
                                          for i in range(2, 5)])
        assert all(isinstance(result, StoreFull) for result in batch), batch

        assert await assert_consistent(store) == before, "a failed append left something"
        assert await store.last_seq() == before[-1].seq
        assert await store.read_job("F1") == [] and await store.get_job("F1") is None

        filler.unlink()
        stored = await store.append("F1", created("F1", "f1.dat"), 0)
        assert [s.seq for s in stored] == [before[-1].seq + 1]
        await store.append_batch([Append(f"F{i}", created(f"F{i}", f"f{i}.dat"), 0)
                                  for i in range(2, 5)])
        after = await assert_consistent(store)
        assert len(after) == len(before) + 4
    finally:
        await store.close()
    assert integrity_check(db) == ["ok"]


class GatedProcessor(BaseProcessor):
    """Writes an output, but only once the test opens the gate (so it finishes on a full disk)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        """Wait for the gate, then copy the input to output/."""
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        with ctx.open_output(ctx.input_path.name.partition("--")[2] + ".out") as handle:
            handle.write(ctx.input_path.read_bytes())
        return {"ok": True}


async def run_through_full_disk(tmp_path: Path, disk: Path, full_for_s: float) -> None:
    """A job finishes while the disk is full for `full_for_s`; then space is freed."""
    data_dir = tmp_path / "data"
    processor = GatedProcessor()
    async with Kernel.open(store=f"sqlite:///{disk / 'multiflow.db'}", data_dir=data_dir,
                           drain_grace_s=2.0) as kernel:
        try:
            kernel.register_workflow(WORKFLOW, processor, config=WorkflowConfig(
                backoff_base_s=0.01, timeout_s=60.0))
            inbox = data_dir / WORKFLOW / "input"
            for name in ("a.dat", "b.dat"):
                (inbox / name).write_bytes(f"content of {name}\n".encode())
            job = await kernel.submit(WORKFLOW, "a.dat")
            assert await anyio.to_thread.run_sync(processor.entered.wait, WAIT_S)

            filler = fill(disk)
            with pytest.raises(StoreFull, match="full"):
                await kernel.submit(WORKFLOW, "b.dat")
            processor.gate.set()  # its JobCompleted now meets the full disk
            await anyio.sleep(full_for_s)
            assert (await kernel.store.get_job(job.id)).status is Status.RUNNING  # type: ignore[union-attr]
            filler.unlink()

            done = await kernel.wait(job.id, timeout_s=RESUME_S)
            assert done.status is Status.COMPLETED, done.error
            second = await kernel.submit(WORKFLOW, "b.dat")
            assert (await kernel.wait(second.id, timeout_s=RESUME_S)).status is Status.COMPLETED
        finally:
            processor.gate.set()

    store = await SqliteEventStore.open(disk / "multiflow.db", readonly=True)
    try:
        events = await assert_consistent(store)
    finally:
        await store.close()
    created_files = [e.event.file_path for e in events if isinstance(e.event, JobCreated)]
    assert sorted(created_files) == [f"{WORKFLOW}/input/a.dat", f"{WORKFLOW}/input/b.dat"]
    assert sum(isinstance(e.event, JobCompleted) for e in events) == 2
    assert sorted(p.name for p in (data_dir / WORKFLOW / "output").iterdir()) == [
        "a.dat.out", "b.dat.out"]
    assert integrity_check(disk / "multiflow.db") == ["ok"]


@pytest.mark.anyio
async def test_processing_resumes_after_a_brief_full_disk(
    tmp_path: Path, small_disk: Path,
) -> None:
    """A job that finishes during a one-second full disk is recorded completed once space
    is freed, and new jobs run again."""
    await run_through_full_disk(tmp_path, small_disk, full_for_s=1.0)


@pytest.mark.anyio
async def test_processing_resumes_after_a_full_disk_outlasting_the_retry_budget(
    tmp_path: Path, small_disk: Path,
) -> None:
    """A job that finishes while the disk stays full for four seconds is still recorded
    completed once space is freed."""
    await run_through_full_disk(tmp_path, small_disk, full_for_s=4.0)


class GatedRefusal(BaseProcessor):
    """Refuses every file at intake, but only once the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def validate_file(self, path: Path) -> str | None:
        """Wait for the gate, then refuse."""
        self.entered.set()
        self.gate.wait(WAIT_S)
        return "refused by the test"

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        """Never reached: intake refuses every file."""
        raise AssertionError("a refused file was processed")


@pytest.mark.anyio
async def test_a_refusal_at_intake_on_a_full_disk_is_recorded_once_space_is_freed(
    tmp_path: Path, small_disk: Path,
) -> None:
    """An intake refusal whose JobFailed meets a full disk does not bring the kernel down:
    once space is freed the job ends failed and its file lies in error/."""
    data_dir = tmp_path / "data"
    processor = GatedRefusal()
    async with Kernel.open(store=f"sqlite:///{small_disk / 'multiflow.db'}",
                           data_dir=data_dir, drain_grace_s=2.0) as kernel:
        try:
            kernel.register_workflow(WORKFLOW, processor)
            (data_dir / WORKFLOW / "input" / "a.dat").write_bytes(b"refuse me\n")
            job = await kernel.submit(WORKFLOW, "a.dat")
            assert await anyio.to_thread.run_sync(processor.entered.wait, WAIT_S)
            filler = fill(small_disk)
            processor.gate.set()  # the refusal's JobFailed now meets the full disk
            await anyio.sleep(1.0)
            filler.unlink()
            done = await kernel.wait(job.id, timeout_s=RESUME_S)
        finally:
            processor.gate.set()
    assert done.status is Status.FAILED and done.error is not None
    assert done.error.type == "ValidationError"
    assert (data_dir / done.current_path).read_bytes() == b"refuse me\n"
