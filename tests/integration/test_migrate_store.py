"""`multiflow migrate-store`: an SQLite log copied into PostgreSQL keeps its chain and jobs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import psycopg
import pytest
from click.testing import CliRunner

from adapters import Kernel
from adapters.audit import verify_chain
from adapters.cli import main
from adapters.notify.records import AlertRecord, DeadLetter
from adapters.notify.settings import WebhookTarget
from adapters.notify.webhooks import WebhookConsumer
from adapters.postgres import PostgresEventStore
from adapters.postgres.migrate import migrate_store
from adapters.sqlite import SqliteEventStore
from kernel.config import WorkflowConfig
from kernel.ports import StoreError, StoreLocked
from kernel.state import replay
from tests.benchmarks.common import NoOp
from tests.integration.test_ops_cli import fill

URL = os.environ.get("MULTIFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def target() -> Iterator[str]:
    """An empty schema on the test server (dropped afterwards), as a store URL."""
    try:
        with psycopg.connect(URL, connect_timeout=3):
            pass
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {URL} is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {URL}: {exc}")
    name = f"mf_migrate_{uuid.uuid4().hex[:12]}"
    yield f"{URL}?schema={name}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def make_history(data: Path) -> None:
    async with Kernel.open(data_dir=data) as kernel:
        kernel.register_workflow("w", NoOp(), config=WorkflowConfig(settle_ms=0))
        ids = []
        for i in range(30):
            (data / "w/input" / f"{i}.txt").write_text("x")
            ids.append((await kernel.submit("w", f"{i}.txt", priority=i % 3)).id)
        for job_id in ids[:25]:
            await kernel.wait(job_id, timeout_s=10)
        await kernel.store.set_checkpoint("webhook:ops", 7)  # type: ignore[attr-defined]


def test_migrate_store_copies_the_log_and_its_chain(tmp_path: Path, target: str) -> None:
    """Every event arrives byte for byte; the chain verifies; jobs equal the fold of the log."""
    data = tmp_path / "data"
    anyio.run(make_history, data)
    result = CliRunner().invoke(main, ["migrate-store", "--data-dir", str(data), "--to", target])
    assert result.exit_code == 0, result.output
    assert "the chain verifies" in result.output

    async def inspect() -> None:
        store = await PostgresEventStore.open(target)
        try:
            events = await store.read_all(0, 10_000)
            assert (await verify_chain(store)).ok
            for job_id, job in replay(events).items():
                assert await store.get_job(job_id) == job
            assert await store.get_checkpoint("webhook:ops") == 7
        finally:
            await store.close()

    anyio.run(inspect)
    again = CliRunner().invoke(main, ["migrate-store", "--data-dir", str(data), "--to", target])
    assert again.exit_code == 2 and "already holds events" in again.output


@pytest.mark.anyio
async def test_migrate_store_is_refused_while_a_server_writes_the_sqlite_log(
        tmp_path: Path, target: str) -> None:
    """A server still running on the SQLite log would append after the copy, and those
    events never reach PostgreSQL: the copy is refused while the writer's lock is held,
    and nothing is written to the target."""
    db = tmp_path / "multiflow.db"
    await anyio.to_thread.run_sync(fill, db, 10)
    server = await SqliteEventStore.open(db)  # holds multiflow.db.lock, as `multiflow run`
    try:
        with pytest.raises(StoreLocked):
            await migrate_store(db, target)
    finally:
        await server.close()
    assert await pg_last_seq(target) == 0


@pytest.mark.anyio
async def test_an_interrupted_migration_can_be_run_again(tmp_path: Path, target: str) -> None:
    """The copy is one transaction: cut short (Ctrl-C, the network) it leaves the target
    empty, and the next run copies everything (pages of 5,000 events, each its own
    transaction, left half a log that nodes would start on, and refused the next run)."""
    db = tmp_path / "multiflow.db"
    await anyio.to_thread.run_sync(fill, db, 4000)  # 12,000 events: three pages

    def cut(done: int, total: int) -> None:
        raise KeyboardInterrupt  # the operator's Ctrl-C, or a lost connection

    with pytest.raises(KeyboardInterrupt):
        await migrate_store(db, target, cut)
    copied = await pg_last_seq(target)
    assert copied == 0, f"the target holds a half log: {copied} of 12,000 events"
    report = await migrate_store(db, target)  # and a second run completes the copy
    assert report.events == 12_000


@pytest.mark.anyio
async def test_migrate_store_keeps_dead_letters_and_alert_history(tmp_path: Path,
                                                                  target: str) -> None:
    """Webhook deliveries that never succeeded (dead letters, for an operator to redeliver,
    by the same id) and the alert history are copied with the checkpoints."""
    db = tmp_path / "multiflow.db"
    await anyio.to_thread.run_sync(fill, db, 3)
    store = await SqliteEventStore.open(db)
    try:
        await store.add_dead_letter(DeadLetter(
            target="ops", seq=3, job_id="J00000000", event_type="job.completed", attempts=8,
            last_error="503", created_at=datetime.now(UTC)))
        await store.record_alert(AlertRecord(rule="failures", state="fired",
                                             at=datetime.now(UTC), detail="x"))
    finally:
        await store.close()
    await migrate_store(db, target)
    pg = await PostgresEventStore.open(target)
    try:
        (letter,) = await pg.list_dead_letters()
        assert (letter.id, letter.job_id) == (1, "J00000000")
        assert len(await pg.list_alerts()) == 1
    finally:
        await pg.close()


@pytest.mark.anyio
async def test_migrate_store_copies_a_log_written_by_an_older_schema(tmp_path: Path,
                                                                   target: str) -> None:
    """A log last opened by an older multiflow (schema 1: no checkpoints table) is brought
    up to date and copied (read as it was, it failed after copying every event)."""
    import sqlite3

    db = tmp_path / "multiflow.db"
    await anyio.to_thread.run_sync(fill, db, 3)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript("DROP TABLE checkpoints; DROP INDEX jobs_by_channel; "
                       "DROP TABLE dead_letters; DROP TABLE alerts; DROP INDEX jobs_by_file; "
                       "PRAGMA user_version=1;")
    conn.close()
    try:
        report = await migrate_store(db, target)
    except StoreError as exc:
        copied = await pg_last_seq(target)
        pytest.fail(f"migrate-store failed ({exc}) after copying {copied} events")
    assert report.events == 9


def test_migrate_store_to_an_unreachable_postgresql_exits_instead_of_hanging(
        tmp_path: Path) -> None:
    """An unreachable target is an error and exit code 2, at once (the source stayed open,
    and its thread kept the process alive for ever)."""
    import subprocess
    import sys

    data = tmp_path / "data"
    fill(data / "multiflow.db", 2)
    root = Path(__file__).resolve().parents[1]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "from adapters.cli import main; main()", "migrate-store",
             "--data-dir", str(data), "--to", "postgresql://postgres@127.0.0.1:1/none"],
            env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, timeout=45)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"migrate-store still runs 45 s later; it printed: {exc.stderr!r}")
    assert proc.returncode == 2


async def pg_last_seq(url: str) -> int:
    store = await PostgresEventStore.open(url)
    try:
        return await store.last_seq()
    finally:
        await store.close()


def test_migrate_into_a_store_a_node_was_started_on_once(tmp_path: Path, target: str) -> None:
    """A node started once on the empty target left a webhook checkpoint at 0: the source's
    checkpoints replace it (the copy failed on the duplicate row)."""
    data = tmp_path / "data"
    anyio.run(make_history, data)  # the source has checkpoint webhook:ops = 7

    async def start_once_on_the_target() -> None:
        store = await PostgresEventStore.open(target)
        try:
            consumer = WebhookConsumer(
                WebhookTarget(name="ops", url="http://127.0.0.1:9/hook", secret="s"),
                store, store)
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)  # a new target: checkpoint at the head (0)
                tg.cancel_scope.cancel()
            assert await store.get_checkpoint("webhook:ops") == 0
            assert await store.last_seq() == 0  # no event: an empty store
        finally:
            await store.close()

    anyio.run(start_once_on_the_target)
    report = anyio.run(migrate_store, data / "multiflow.db", target)
    assert report.checkpoints == 1

    async def check() -> None:
        store = await PostgresEventStore.open(target)
        try:
            assert await store.get_checkpoint("webhook:ops") == 7
        finally:
            await store.close()

    anyio.run(check)
