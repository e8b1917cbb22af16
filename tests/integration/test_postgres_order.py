"""A global order readers can trust on PostgreSQL: no reader ever sees seq N+1 before N."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import psycopg
import pytest

from adapters.audit import verify_chain
from adapters.postgres import PostgresEventStore
from kernel.events import JobCreated
from kernel.ports import Append, StoreError
from tests.integration.pgkit import URL, server_or_skip

pytestmark = pytest.mark.anyio
@pytest.fixture
async def schema() -> AsyncIterator[str]:
    server_or_skip()
    name = f"mf_order_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def created(job_id: str) -> JobCreated:
    return JobCreated(job_id=job_id, at=datetime.now(UTC), workflow_name="wf",
                      file_path=f"wf/input/{job_id}")


async def test_a_sequence_lets_a_reader_see_n_plus_1_before_n(schema: str) -> None:
    """The naive design (a sequence) reproduces the gap: the reason appends take a lock."""
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as setup:
        await setup.execute(f'CREATE SCHEMA "{schema}"')
        await setup.execute(f'CREATE TABLE "{schema}".naive (seq BIGSERIAL PRIMARY KEY, x TEXT)')
    slow = await psycopg.AsyncConnection.connect(URL)
    fast = await psycopg.AsyncConnection.connect(URL, autocommit=True)
    reader = await psycopg.AsyncConnection.connect(URL, autocommit=True)
    try:
        await slow.execute(f'INSERT INTO "{schema}".naive (x) VALUES (%s)', ("first",))  # open tx
        await fast.execute(f'INSERT INTO "{schema}".naive (x) VALUES (%s)', ("second",))
        seen = [r[0] for r in await (await reader.execute(
            f'SELECT seq FROM "{schema}".naive ORDER BY seq')).fetchall()]
        await slow.commit()
        later = [r[0] for r in await (await reader.execute(
            f'SELECT seq FROM "{schema}".naive ORDER BY seq')).fetchall()]
    finally:
        for conn in (slow, fast, reader):
            await conn.close()
    # The reader saw 2 while 1 was not yet committed: a tailer at "after=2" skips 1 for ever.
    assert seen == [2] and later == [1, 2]


async def test_appends_wait_for_an_open_append_instead_of_overtaking_it(schema: str) -> None:
    """While one append holds the log, another waits; readers see the log grow in order only."""
    store = await PostgresEventStore.open(f"{URL}?schema={schema}")
    try:
        await store.append("j1", [created("j1")], 0)
        holder = await psycopg.AsyncConnection.connect(URL)
        await holder.execute(f'SET search_path TO "{schema}"')
        # Hold the lock the way a slow appender on another node would, mid-transaction.
        await holder.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        done = anyio.Event()

        async def append_second() -> None:
            await store.append("j2", [created("j2")], 0)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(append_second)
            await anyio.sleep(0.5)
            assert not done.is_set(), "an append overtook a transaction holding the log"
            assert [e.seq for e in await store.read_all(0)] == [1]  # readers are not blocked
            await holder.commit()
            with anyio.fail_after(10):
                await done.wait()
        await holder.close()
        events = await store.read_all(0)
    finally:
        await store.close()
    assert [(e.seq, e.job_id) for e in events] == [(1, "j1"), (2, "j2")]


async def test_two_stores_racing_on_one_database_make_one_gapless_chain(schema: str) -> None:
    """Two nodes appending at once get interleaved, gapless seqs and one verifiable chain."""
    from adapters.audit import verify_chain

    one = await PostgresEventStore.open(f"{URL}?schema={schema}")
    two = await PostgresEventStore.open(f"{URL}?schema={schema}")
    try:
        async def write(store: PostgresEventStore, prefix: str) -> None:
            for i in range(100):
                await store.append(f"{prefix}{i}", [created(f"{prefix}{i}")], 0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(write, one, "a")
            tg.start_soon(write, two, "b")
        events = await one.read_all(0, 1000)
        report = await verify_chain(two)
    finally:
        await one.close()
        await two.close()
    assert [e.seq for e in events] == list(range(1, 201))
    assert report.ok and report.checked == 200


async def test_a_group_the_server_refuses_leaves_nothing_and_the_log_goes_on(schema: str
                                                                           ) -> None:
    """An error inside the append's transaction (a trigger on a row), or at its COMMIT (a
    deferred one), rolls the whole group back; its connection (the only one) goes on,
    writing the group's appends again one at a time, and then the next append."""
    store = await PostgresEventStore.open(f"{URL}?schema={schema}", pool_max=1)
    try:
        await store.append("j1", [created("j1")], 0)
        async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as setup:
            await setup.execute(
                f'CREATE FUNCTION "{schema}".boom() RETURNS trigger LANGUAGE plpgsql AS '
                "$$ BEGIN IF NEW.job_id IN ('bad', 'late') THEN RAISE EXCEPTION 'refused'; "
                "END IF; RETURN NEW; END $$")
            await setup.execute(f'CREATE TRIGGER boom BEFORE INSERT ON "{schema}".events '
                                "FOR EACH ROW WHEN (NEW.job_id = 'bad') "
                                f'EXECUTE FUNCTION "{schema}".boom()')
            await setup.execute(f'CREATE CONSTRAINT TRIGGER late AFTER INSERT ON "{schema}".events '
                                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                                f"WHEN (NEW.job_id = 'late') EXECUTE FUNCTION \"{schema}\".boom()")
        seq = 1
        for refused in ("bad", "late"):
            beside = f"ok-{refused}"
            results = await store.append_batch([Append(beside, [created(beside)], 0),
                                                Append(refused, [created(refused)], 0)])
            # The group is rolled back whole, then written one append at a time: only
            # the refused one fails, and the log has no gap.
            assert isinstance(results[1], StoreError)
            assert [s.seq for s in results[0]] == [seq + 1]  # type: ignore[union-attr]
            assert await store.get_job(beside) is not None
            assert await store.get_job(refused) is None
            stored = await store.append(f"j-{refused}", [created(f"j-{refused}")], 0)
            seq += 2
            assert [s.seq for s in stored] == [seq]
        assert (await verify_chain(store)).ok
    finally:
        await store.close()
