"""`multiflow migrate-store`: an SQLite log copied into PostgreSQL keeps its chain and jobs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from click.testing import CliRunner

from adapters import Kernel
from adapters.audit import verify_chain
from adapters.cli import main
from adapters.postgres import PostgresEventStore
from kernel.config import WorkflowConfig
from kernel.state import replay
from tests.benchmarks.common import NoOp

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
