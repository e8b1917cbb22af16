"""Claims on the shared log (`Cluster.append_claims`): which candidates start, and why not.

A node offers its free slots' candidates and a few spares behind them, should other
nodes take the first ones meanwhile; the store starts them in order, under its lock,
while the claim's slots and the cluster's limits allow.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
import pytest

from adapters.postgres import PostgresEventStore
from kernel.chain import verify
from kernel.events import JobCreated, JobStarted
from kernel.ports import Append, ClaimLimits, ConcurrencyConflict, NotClaimed
from tests.integration.pgkit import URL, server_or_skip

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store() -> AsyncIterator[PostgresEventStore]:
    server_or_skip()
    name = f"mf_claims_{uuid.uuid4().hex[:12]}"
    opened = await PostgresEventStore.open(f"{URL}?schema={name}")
    try:
        yield opened
    finally:
        await opened.close()
        async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def created(job_id: str, workflow: str = "wf") -> JobCreated:
    return JobCreated(job_id=job_id, at=datetime.now(UTC), workflow_name=workflow,
                      file_path=f"{workflow}/input/{job_id}")


def start(job_id: str, expected_version: int = 1) -> Append:
    return Append(job_id, [JobStarted(job_id=job_id, at=datetime.now(UTC), attempt=1,
                                      worker="node")], expected_version)


async def pending(store: PostgresEventStore, *job_ids: str, workflow: str = "wf") -> None:
    await store.append_batch([Append(j, [created(j, workflow)], 0) for j in job_ids])


def outcome(result: object) -> str:
    if isinstance(result, ConcurrencyConflict):
        return "conflict"
    if isinstance(result, NotClaimed):
        return "not claimed"
    assert isinstance(result, list), result
    return "started"


async def test_spares_start_in_order_only_while_the_claim_has_free_slots(
        store: PostgresEventStore) -> None:
    """Candidates another node took are skipped; the next ones fill the slots; the spares
    left over are not claimed (and stay pending)."""
    await pending(store, "a", "b", "c", "d", "e")
    await store.append_batch([start("a")])  # another node was faster
    _, taken = await store.append_claims(
        [], [start(j) for j in "abcde"], ClaimLimits(slots=2))
    assert [outcome(r) for r in taken] == [
        "conflict", "started", "started", "not claimed", "not claimed"]
    assert [(await store.get_job(j)).status.value for j in "de"] == ["pending", "pending"]  # type: ignore[union-attr]


async def test_each_claim_of_a_group_fills_its_own_slots(store: PostgresEventStore) -> None:
    """Two claims issued together (two slots freed at once) share one group: each starts
    up to its own slots, in order, beside an append that is not a claim."""
    await pending(store, "a", "b", "c", "d", "x")
    results: dict[str, Any] = {}

    async def claim(name: str, firsts: list[Append], candidates: list[Append]) -> None:
        results[name] = await store.append_claims(firsts, candidates, ClaimLimits(slots=1))

    writes: list[int] = []
    write = store._committer._write

    async def counted(requests: list[Any]) -> None:
        writes.append(len(requests))
        await write(requests)

    store._committer._write = counted
    async with anyio.create_task_group() as tg:
        tg.start_soon(claim, "one", [start("x")], [start("a"), start("b")])
        tg.start_soon(claim, "two", [], [start("c"), start("d")])
    assert writes == [5]  # one group
    assert outcome(results["one"][0][0]) == "started"
    assert [outcome(r) for r in results["one"][1]] == ["started", "not claimed"]
    assert [outcome(r) for r in results["two"][1]] == ["started", "not claimed"]


async def test_a_spare_taken_elsewhere_is_a_conflict_even_once_the_claim_is_full(
        store: PostgresEventStore) -> None:
    """A spare another node started says so (ConcurrencyConflict: the node re-reads it and
    drops it from its queue) even after the claim's slots are taken; the spares still
    pending are merely not claimed."""
    await pending(store, "a", "b", "c", "d")
    await store.append_batch([start("d")])  # another node was faster, on a spare
    _, taken = await store.append_claims([], [start(j) for j in "abcd"], ClaimLimits(slots=1))
    assert [outcome(r) for r in taken] == ["started", "not claimed", "not claimed", "conflict"]


async def test_the_cluster_wide_limits_hold_however_many_slots_are_free(
        store: PostgresEventStore) -> None:
    """`running` caps the jobs running in the whole cluster and `per_workflow` a workflow's,
    counting the jobs this very claim starts."""
    await pending(store, "r1", "a", "b", "c")
    await pending(store, "p1", "p2", workflow="pdf")
    await store.append_batch([start("r1")])  # one running already, on some node
    _, taken = await store.append_claims(
        [], [start("a"), start("b"), start("c")], ClaimLimits(slots=4, running=2))
    assert [outcome(r) for r in taken] == ["started", "not claimed", "not claimed"]
    _, taken = await store.append_claims(
        [], [start("p1"), start("p2"), start("b")],
        ClaimLimits(slots=4, per_workflow={"pdf": 1}))
    assert [outcome(r) for r in taken] == ["started", "not claimed", "started"]


async def refuse_jobs_named(store: PostgresEventStore, marker: str) -> None:
    """An operator's trigger that makes the server refuse any event of a job id holding
    `marker` (what a value PostgreSQL cannot take would do)."""
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        schema = store.schema_name
        await conn.execute(
            f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$ '
            f"BEGIN IF NEW.job_id LIKE '%{marker}%' THEN RAISE EXCEPTION 'refused by a "
            "trigger'; END IF; RETURN NEW; END $$")
        await conn.execute(f'CREATE TRIGGER refuse BEFORE INSERT ON "{schema}".events '
                           f'FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()')


async def test_an_append_the_server_refuses_fails_alone(store: PostgresEventStore) -> None:
    """One append the server refuses does not take the others of its group with it: an
    outcome grouped beside a refused claim (or a refused submit) is still written."""
    await pending(store, "done-1", "bad-1", "ok-1")
    await store.append_batch([start("done-1")])
    await refuse_jobs_named(store, "bad")
    appends, taken = await store.append_claims(
        [Append("done-1", [JobStarted(job_id="done-1", at=datetime.now(UTC), attempt=2,
                                      worker="node")], 2)],
        [start("bad-1"), start("ok-1")], ClaimLimits(slots=1))
    assert isinstance(appends[0], list), appends[0]  # written, not failed with the claim
    assert "refused by a trigger" in str(taken[0])
    assert not isinstance(taken[1], list)  # the claim failed as a whole: nothing started
    assert (await store.get_job("done-1")).attempts == 2  # type: ignore[union-attr]
    results = await store.append_batch([Append("bad-2", [created("bad-2")], 0),
                                        Append("ok-2", [created("ok-2")], 0)])
    assert "refused by a trigger" in str(results[0])
    assert isinstance(results[1], list)
    assert (await store.get_job("ok-2")) is not None
    assert (await store.get_job("bad-2")) is None
    assert verify(await store.read_chain()).ok


async def test_a_claim_made_beside_a_refused_outcome_does_not_start(
        store: PostgresEventStore) -> None:
    """Candidates marked `if_all_before` start only if the appends of their claim were
    stored: an outcome refused by a conflict keeps its slot taken in the log."""
    await pending(store, "done-1", "next-1")
    await store.append_batch([start("done-1")])
    appends, taken = await store.append_claims(
        [Append("done-1", [JobStarted(job_id="done-1", at=datetime.now(UTC), attempt=2,
                                      worker="node")], 7)],  # a stale version
        [Append("next-1", start("next-1").events, 1, if_all_before=True)],
        ClaimLimits(slots=1))
    assert isinstance(appends[0], ConcurrencyConflict)
    assert outcome(taken[0]) == "not claimed"
    assert (await store.get_job("next-1")).status.value == "pending"  # type: ignore[union-attr]
