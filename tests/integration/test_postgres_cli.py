"""`multiflow audit verify`, `replay` and `rebuild` against a PostgreSQL store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psycopg
import pytest
from click.testing import CliRunner

from adapters.cli import main
from adapters.postgres import PostgresEventStore
from tests.integration.pgkit import URL, fresh_schema, store_url
from tests.integration.test_cluster import Sleep, inputs, node

pytestmark = pytest.mark.anyio


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async for name in fresh_schema("mf_cli"):
        yield name


def jobs_table(schema: str) -> list[tuple[object, ...]]:
    with psycopg.connect(URL) as conn:
        return conn.execute(f'SELECT id, status, version, seq, body FROM "{schema}".jobs '
                            "ORDER BY id").fetchall()


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


async def test_audit_replay_and_rebuild_work_on_postgresql(schema: str, tmp_path: Path) -> None:
    url = store_url(schema)
    names = inputs(tmp_path, 3)
    async with node(schema, tmp_path, Sleep(0.01)) as kernel:
        for name in names:
            await kernel.wait((await kernel.submit("wf", name)).id, timeout_s=20)
    before = jobs_table(schema)

    code, out = await anyio.to_thread.run_sync(invoke, "audit", "verify", "--store", url)
    assert code == 0 and "ok" in out and "9 events" in out, out
    code, out = await anyio.to_thread.run_sync(invoke, "replay", "--store", url, "--at", "4")
    assert code == 0 and "as of seq 4" in out, out

    code, out = await anyio.to_thread.run_sync(invoke, "rebuild", "--store", url)
    assert code == 0 and "rebuilt 3 jobs from 9 events" in out, out
    assert jobs_table(schema) == before

    other = await PostgresEventStore.open(url, node_id="alive")
    try:
        await other.heartbeat(30)
        code, out = await anyio.to_thread.run_sync(invoke, "rebuild", "--store", url)
        assert code == 2 and "alive" in out, out
    finally:
        await other._pool.close()

    with psycopg.connect(URL) as conn:
        conn.execute(f'UPDATE "{schema}".events SET payload = payload || \' \' WHERE seq = 5')
    code, out = await anyio.to_thread.run_sync(invoke, "audit", "verify", "--store", url)
    assert code == 1 and "seq 5" in out, out
