"""A power cut at any commit of the log leaves every file recoverable and runs nothing twice.

kill -9 loses no rename (the page cache survives it); a power cut loses every rename
whose folder was not fsynced after it. `Journal` models that conservatively: a rename
survives only once an fsync of its target folder began after it and returned. At each
commit of the log (in the writer thread, right after the commit, before anyone acts
on it) the test keeps what a power cut would leave: a copy of the log file and the
files where the surviving renames put them. Every such state must hold the invariant
recovery relies on (a completed job's file is not back in input/, every file is
somewhere its job's lifecycle could have left it), and a kernel restarted on some of
them must finish each file exactly once.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

import adapters.files
import adapters.fsutil
from adapters import Kernel
from adapters.files import FileNotInInput, HotFolders
from adapters.sqlite import SqliteEventStore
from kernel.config import WorkflowConfig
from kernel.events import JobCompleted, JobCreated
from kernel.state import Job, Status
from kernel.task import BaseProcessor, JobContext

pytestmark = pytest.mark.anyio

WORKFLOW = "cut"
FILES = 24
RESTARTS = 4  # snapshots a kernel is restarted on (the others are checked statically)


class NoOp(BaseProcessor):
    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return {}


class Snapshot:
    """What a power cut right after one commit would leave: the log and the files."""

    def __init__(self, db: Path, files: list[str]) -> None:
        self.db = db
        self.files = files  # data-root relative paths of the workflow's files


class Journal:
    """Records renames and folder fsyncs; knows which renames a power cut would keep."""

    def __init__(self, data_dir: Path, snapshots_dir: Path,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_dir = data_dir
        self.snapshots_dir = snapshots_dir
        self.lock = threading.RLock()
        self.clock = 0
        self.pending: list[tuple[int, str, str]] = []  # (when, source, target), not durable
        self.snapshots: list[Snapshot] = []
        self.errors: list[BaseException] = []
        real_move, real_fsync = adapters.files.move, adapters.fsutil.fsync_dir

        def move(source: str | Path, target: str | Path, **options: Any) -> None:
            with self.lock:
                self.clock += 1
                self.pending.append((self.clock, str(source), str(target)))
                real_move(source, target, **options)

        def fsync_dir(path: str | Path) -> None:
            with self.lock:
                self.clock += 1
                began = self.clock
            real_fsync(path)
            with self.lock:
                self.pending = [(when, source, target) for when, source, target in self.pending
                                if not (when < began and os.path.dirname(target) == str(path))]

        monkeypatch.setattr(adapters.files, "move", move)
        monkeypatch.setattr(adapters.fsutil, "fsync_dir", fsync_dir)

    def on_commit(self, seconds: float, events: int) -> None:
        """The store's commit hook (writer thread): keep what a power cut now would leave."""
        try:
            with self.lock:
                root = self.data_dir / WORKFLOW
                present = {os.path.join(d, f) for d, _, names in os.walk(root) for f in names}
                for _, source, target in reversed(self.pending):
                    if target in present:
                        present.remove(target)
                        present.add(source)
                db = self.snapshots_dir / f"{len(self.snapshots):04d}.db"
                copy_log(self.data_dir / "multiflow.db", db)
                files = sorted(os.path.relpath(p, self.data_dir) for p in present)
                self.snapshots.append(Snapshot(db, files))
        except BaseException as exc:  # the store swallows a hook's errors: keep them
            self.errors.append(exc)


def copy_log(source: Path, target: Path) -> None:
    """A consistent copy of the committed log (SQLite's backup API)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def content(name: str) -> bytes:
    return f"the file {name}\n".encode()


def read_jobs(db: Path) -> list[Job]:
    conn = sqlite3.connect(db)
    try:
        return [msgspec.json.decode(body, type=Job)
                for (body,) in conn.execute("SELECT body FROM jobs")]
    finally:
        conn.close()


def violations(snapshot: Snapshot) -> list[str]:
    """Where the snapshot breaks what recovery relies on."""
    found = []
    files = set(snapshot.files)
    for job in read_jobs(snapshot.db):
        if job.status is Status.COMPLETED and job.file_path in files:
            found.append(f"{job.file_path}: completed, yet back in input/")
        places = {job.file_path, f"{WORKFLOW}/processing/{job.id}--{Path(job.file_path).name}",
                  job.current_path}
        if not places & files:
            found.append(f"{job.file_path}: lost ({job.status}, at {job.current_path})")
    return found


async def run(data_dir: Path, journal: Journal | None, names: list[str]) -> None:
    """One life: recover, submit whatever lies in input/, wait for every job."""
    async with Kernel.open(data_dir=data_dir, concurrency=2) as kernel:
        if journal is not None:
            assert isinstance(kernel.store, SqliteEventStore)
            kernel.store.commit_observer = journal.on_commit
        kernel.register_workflow(WORKFLOW, NoOp(), config=WorkflowConfig(
            settle_ms=0, backoff_base_s=0.01, backoff_max_s=0.05))
        await kernel.ready(WORKFLOW)
        ids = []
        for name in names:
            try:
                ids.append((await kernel.submit(WORKFLOW, name)).id)
            except FileNotInInput:
                continue  # not in input/ (or claimed meanwhile by its recovered job)
        for job_id in ids:
            await kernel.wait(job_id, timeout_s=30)
        for job in await kernel.store.active_jobs(WORKFLOW):
            await kernel.wait(job.id, timeout_s=30)  # recovered retries


def seed(data_dir: Path, names: list[str]) -> None:
    HotFolders(data_dir).ensure_layout(WORKFLOW)
    for name in names:
        (data_dir / WORKFLOW / "input" / name).write_bytes(content(name))


def materialize(snapshot: Snapshot, target: Path) -> None:
    """The data dir a power cut at this snapshot would leave."""
    HotFolders(target).ensure_layout(WORKFLOW)
    copy_log(snapshot.db, target / "multiflow.db")
    for relative in snapshot.files:
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(path.name.partition("--")[2] or path.name))


async def audit(data_dir: Path, names: list[str]) -> None:
    """Each file completed exactly once, by one job, and rests in archive/."""
    store = await SqliteEventStore.open(data_dir / "multiflow.db", readonly=True)
    try:
        events = await store.read_all(0, 100_000)
    finally:
        await store.close()
    created = {e.job_id: Path(e.event.file_path).name for e in events
               if isinstance(e.event, JobCreated)}
    completed = Counter(created[e.job_id] for e in events if isinstance(e.event, JobCompleted))
    assert completed == Counter(names), "a file completed twice, or never"
    archived = Counter(p.name.partition("--")[2]
                       for p in (data_dir / WORKFLOW / "archive").rglob("*--*"))
    assert archived == Counter(names)
    assert list((data_dir / WORKFLOW / "input").iterdir()) == []


async def cut_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Journal:
    names = [f"f{i:03d}.dat" for i in range(FILES)]
    data_dir = tmp_path / "data"
    seed(data_dir, names)
    journal = Journal(data_dir, tmp_path / "snapshots", monkeypatch)
    journal.snapshots_dir.mkdir()
    await run(data_dir, journal, names)
    assert not journal.errors, journal.errors
    assert len(journal.snapshots) >= FILES // 2
    return journal


async def test_a_power_cut_at_any_commit_leaves_every_file_recoverable_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every commit, the files a power cut would keep are where recovery looks for them
    (no completed job's file back in input/), and kernels restarted on a spread of those
    states finish each file exactly once."""
    journal = await cut_everywhere(tmp_path, monkeypatch)
    names = [f"f{i:03d}.dat" for i in range(FILES)]
    bad = {i: v for i, s in enumerate(journal.snapshots) if (v := violations(s))}
    assert not bad, bad
    monkeypatch.undo()  # the restarted lives run on the real file system calls
    step = max(1, len(journal.snapshots) // RESTARTS)
    for index in range(step // 2, len(journal.snapshots), step):
        restarted = tmp_path / f"after-{index}"
        materialize(journal.snapshots[index], restarted)
        await run(restarted, None, names)
        await audit(restarted, names)


async def test_the_power_cut_oracle_sees_a_claim_that_was_not_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the claim's fsync of processing/, some commit would leave a completed job's
    file back in input/ (new work after a power cut): the oracle above catches it."""
    real_claim = HotFolders._claim

    def claim_without_fsync(self: HotFolders, job: Job, dirty: set[str]) -> None:
        real_claim(self, job, set())  # the folder it dirtied is never handed to the lane

    monkeypatch.setattr(HotFolders, "_claim", claim_without_fsync)
    journal = await cut_everywhere(tmp_path, monkeypatch)
    found = [v for s in journal.snapshots for v in violations(s)]
    assert any("back in input/" in v for v in found)
