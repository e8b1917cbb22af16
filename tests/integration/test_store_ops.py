"""Operations on a real SQLite log: migration, rebuild, audit verify, replay, from the CLI."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from adapters.audit import snapshot_at, verify_chain
from adapters.cli import main
from adapters.sqlite import SqliteEventStore
from adapters.sqlite.schema import MIGRATIONS, SCHEMA_VERSION, apply_migration
from adapters.sqlrows import JOB_COLUMNS
from kernel.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobDuplicateReceived,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
)
from kernel.state import Status, replay

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def fill(path: Path, jobs: int = 5) -> None:
    """A log of `jobs` jobs: all created, the even ones started, every fourth completed."""
    store = await SqliteEventStore.open(path)
    try:
        for i in range(jobs):
            job_id = f"job-{i}"
            at = T0 + timedelta(minutes=i)
            await store.append(job_id, [JobCreated(
                job_id=job_id, at=at, workflow_name="wf", file_path=f"wf/input/{i}.txt",
                priority=i % 3)], 0)
            if i % 2 == 0:
                await store.append(job_id, [JobStarted(job_id=job_id, at=at, attempt=1)], 1)
            if i % 4 == 0:
                await store.append(job_id, [JobCompleted(job_id=job_id, at=at, attempt=1)], 2)
    finally:
        await store.close()


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.anyio
async def test_a_file_made_by_the_first_schema_is_migrated_on_open(tmp_path: Path) -> None:
    """A log written with schema 1 opens, gains schema 2's tables, and keeps its events."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migration(conn, 1)
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    conn.close()
    assert len(MIGRATIONS) >= 2
    await fill(path)  # opening migrates before writing
    conn = sqlite3.connect(path)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert version == SCHEMA_VERSION
    assert "checkpoints" in tables and "jobs_by_channel" in tables
    store = await SqliteEventStore.open(path, readonly=True)
    assert len(await store.read_all(0, 100)) == 5 + 3 + 2
    await store.close()


@pytest.mark.anyio
async def test_a_schema_1_file_with_data_keeps_it_through_the_migration(tmp_path: Path) -> None:
    """Events written under schema 1 by its own SQL survive the migration and still verify."""
    path = tmp_path / "v1.db"
    await fill(path)
    conn = sqlite3.connect(path, isolation_level=None)
    # Undo every migration after the first, as if the file had never been opened since.
    conn.executescript("DROP TABLE checkpoints; DROP INDEX jobs_by_channel; "
                       "DROP TABLE dead_letters; DROP TABLE alerts; DROP INDEX jobs_by_file; "
                       "PRAGMA user_version=1;")
    conn.close()
    store = await SqliteEventStore.open(path)
    try:
        assert (await verify_chain(store)).ok
        assert len(await store.active_jobs()) == 3
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


@pytest.mark.anyio
async def test_rebuild_reproduces_the_read_model(tmp_path: Path) -> None:
    """Dropping and replaying the read model gives back exactly the rows the live writes made."""
    path = tmp_path / "m.db"
    await fill(path, jobs=40)
    store = await SqliteEventStore.open(path)
    try:
        live = replay(await store.read_all(0, 10**6))
        report = await store.rebuild()
        rebuilt = {job_id: await store.get_job(job_id) for job_id in live}
    finally:
        await store.close()
    assert report.events == 40 + 20 + 10 and report.jobs == 40
    assert rebuilt == live


async def fill_every_kind(path: Path) -> None:
    """Jobs through every event type via the real append path, some left pending or running."""
    later = T0 + timedelta(minutes=1)
    east = timezone(timedelta(hours=2))
    lives: dict[str, list[Event]] = {
        "a": [JobStarted(job_id="a", at=T0, attempt=1, worker="n1"),
              JobProgress(job_id="a", at=T0, fraction=0.5, message="half"),
              JobFailed(job_id="a", at=T0, error_type="Timeout", message="slow", attempt=1,
                        traceback="tb", retry_at=later),
              JobStarted(job_id="a", at=later, attempt=2, worker="n2"),
              JobCompleted(job_id="a", at=later, attempt=2, result={"rows": 3, "x": [1.5]},
                           output_paths=["wf/output/a.json"])],
        "b": [JobFailed(job_id="b", at=T0, error_type="TooLarge", message="refused"),
              JobRetried(job_id="b", at=later, actor="cli", reason="try again"),
              JobStarted(job_id="b", at=later, attempt=1),
              JobCancelled(job_id="b", at=later, actor="api", reason="stop")],
        "c": [JobStarted(job_id="c", at=T0, attempt=1),
              JobCompleted(job_id="c", at=T0.astimezone(east), attempt=1),
              JobDuplicateReceived(job_id="c", at=later, file_path="wf/input/c2.txt",
                                   stored_path="wf/archive/duplicates/c", sha256="00")],
        "d": [JobCancelled(job_id="d", at=T0, actor="cli")],
        "e": [JobStarted(job_id="e", at=T0, attempt=1),
              JobFailed(job_id="e", at=later.astimezone(east), error_type="Boom", message="é\x00")],
        "f": [],
        "g": [JobStarted(job_id="g", at=T0, attempt=1),
              JobProgress(job_id="g", at=later, fraction=0.25)],
    }
    store = await SqliteEventStore.open(path)
    try:
        for job_id, events in lives.items():
            await store.append(job_id, [JobCreated(
                job_id=job_id, at=T0, workflow_name="wf", file_path=f"wf/input/{job_id}.txt",
                channel_name="ch" if job_id in "ac" else None, priority=5 if job_id == "c" else 0,
                params={"level": 6}, completeness="marker", idempotency_key=f"key-{job_id}")], 0)
            for version, event in enumerate(events, start=1):
                await store.append(job_id, [event], version)
    finally:
        await store.close()


def jobs_table(path: Path) -> list[tuple[object, ...]]:
    """Every row of the read model with the SQLite type of each value, by id."""
    columns = [name.strip() for name in JOB_COLUMNS.split(",")]
    typed = ", ".join(f"{name}, typeof({name})" for name in columns)
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {typed} FROM jobs ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest.mark.anyio
async def test_rebuild_gives_back_the_rows_the_live_store_wrote(tmp_path: Path) -> None:
    """After a rebuild every row, column and type is the one the appends wrote, indexes too."""
    path = tmp_path / "every.db"
    await fill_every_kind(path)
    live = jobs_table(path)
    store = await SqliteEventStore.open(path)
    try:
        report = await store.rebuild()
        assert (await store.find_active("wf", "wf/input/f.txt")) is not None
    finally:
        await store.close()
    assert report.jobs == 7 and len(live) == 7
    assert jobs_table(path) == live
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_audit_verify_names_the_first_altered_event(tmp_path: Path) -> None:
    """`multiflow audit verify` passes on a clean log and names the seq someone edited."""
    anyio.run(fill, tmp_path / "multiflow.db")
    code, output = run_cli("audit", "verify", "--data-dir", str(tmp_path))
    assert code == 0 and "10 events" in output
    conn = sqlite3.connect(tmp_path / "multiflow.db", isolation_level=None)
    conn.execute("UPDATE events SET payload = replace(payload, '\"priority\":1', "
                 "'\"priority\":99') WHERE seq = 4")
    conn.close()
    code, output = run_cli("audit", "verify", "--data-dir", str(tmp_path))
    assert code == 1 and "seq 4" in output


def test_audit_verify_detects_a_deleted_event(tmp_path: Path) -> None:
    """A removed row breaks the chain at the gap."""
    anyio.run(fill, tmp_path / "multiflow.db")
    conn = sqlite3.connect(tmp_path / "multiflow.db", isolation_level=None)
    conn.execute("DELETE FROM events WHERE seq = 3")
    conn.close()
    code, output = run_cli("audit", "verify", "--data-dir", str(tmp_path))
    assert code == 1 and "seq 3" in output


def test_rebuild_from_the_cli_and_refused_while_a_server_holds_the_store(tmp_path: Path) -> None:
    """`multiflow rebuild` reports events/s, and refuses (exit 2) while another writer runs."""
    anyio.run(fill, tmp_path / "multiflow.db")
    code, output = run_cli("rebuild", "--data-dir", str(tmp_path))
    assert code == 0 and "rebuilt 5 jobs from 10 events" in output

    async def hold_and_rebuild() -> tuple[int, str]:
        store = await SqliteEventStore.open(tmp_path / "multiflow.db")
        try:
            return await anyio.to_thread.run_sync(run_cli, "rebuild", "--data-dir", str(tmp_path))
        finally:
            await store.close()

    code, output = anyio.run(hold_and_rebuild)
    assert code == 2 and "in use by another multiflow process" in output


@pytest.mark.anyio
async def test_replay_shows_jobs_and_queue_as_they_were(tmp_path: Path) -> None:
    """The state at a past seq or time is the fold of the log up to there."""
    path = tmp_path / "r.db"
    await fill(path, jobs=6)
    store = await SqliteEventStore.open(path, readonly=True)
    try:
        at_start = await snapshot_at(store, seq=1)
        by_time = await snapshot_at(store, at=T0 + timedelta(minutes=2, seconds=30))
        now = await snapshot_at(store, aging_interval_s=None)
        aged = await snapshot_at(store)
    finally:
        await store.close()
    assert list(at_start.jobs) == ["job-0"] and at_start.queue == ["job-0"]
    assert sorted(by_time.jobs) == ["job-0", "job-1", "job-2"]
    assert by_time.jobs["job-0"].status is Status.COMPLETED
    assert by_time.jobs["job-2"].status is Status.RUNNING
    assert now.counts()["completed"] == 2 and now.counts()["running"] == 1
    # pending jobs 1, 3, 5 have priorities 1, 0, 2: highest first
    assert now.queue == ["job-5", "job-1", "job-3"]
    # with one step of aging per minute, created at minutes 1, 3, 5 and seen at minute 5:
    # effective priorities 5, 2, 2; the tie goes to the older job
    assert aged.queue == ["job-1", "job-3", "job-5"]


def test_replay_from_the_cli(tmp_path: Path) -> None:
    """`multiflow replay --at SEQ` prints the counts and the queue at that point."""
    anyio.run(fill, tmp_path / "multiflow.db")
    code, output = run_cli("replay", "--at", "4", "--data-dir", str(tmp_path))
    assert code == 0 and "as of seq 4: 2 jobs" in output and "queue (1): job-1" in output
    code, output = run_cli("replay", "--at", "yesterday", "--data-dir", str(tmp_path))
    assert code == 2 and "neither a seq nor an ISO 8601 time" in output
