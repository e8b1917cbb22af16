"""Several nodes on one PostgreSQL log, in one process: each node is a Kernel of its own.

Claims, the cluster-wide limit, following the other nodes, cancelling across nodes,
recovery after a node's lease expires (and never before). The kill -9 of a node
process is in test_cluster_kill.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters import Kernel
from adapters.postgres import PostgresEventStore
from kernel.config import WorkflowConfig
from kernel.decide import Rejected
from kernel.events import JobCancelled, JobCompleted, JobFailed, JobStarted
from kernel.ports import StoreUnavailable
from kernel.state import Status, StoredEvent
from kernel.task import BaseProcessor, JobContext
from tests.integration.pgkit import fresh_schema, store_url

pytestmark = pytest.mark.anyio


class Sleep(BaseProcessor):
    """Sleeps on the event loop; records where each job ran."""

    def __init__(self, seconds: float = 0.02, ran: list[str] | None = None) -> None:
        self.seconds = seconds
        self.ran = ran if ran is not None else []

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        await anyio.sleep(self.seconds)
        self.ran.append(ctx.job.id)
        return {}


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async for name in fresh_schema("mf_cluster"):
        yield name


@contextlib.asynccontextmanager
async def node(schema: str, data_dir: Path, processor: BaseProcessor, **options: Any
               ) -> AsyncIterator[Kernel]:
    store = await PostgresEventStore.open(store_url(schema))
    options.setdefault("lease_s", 5.0)  # short, yet long enough for a loaded CI machine
    options.setdefault("heartbeat_s", 0.3)
    async with Kernel.open(store, data_dir, drain_grace_s=5, **options) as kernel:
        kernel.register_workflow("wf", processor)
        await kernel.ready("wf")
        yield kernel


def inputs(data_dir: Path, count: int) -> list[str]:
    inbox = data_dir / "wf" / "input"
    inbox.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (inbox / f"f{i:04d}.txt").write_text(str(i))
    return [f"f{i:04d}.txt" for i in range(count)]


def lose_first_reply(kernel: Kernel, *, claims_only: bool = True,
                     then: Callable[[list[str]], Awaitable[object]] | None = None) -> list[str]:
    """Make the first commit (the first holding a claim taken, with `claims_only`) land
    on the server and yet report StoreUnavailable, as when the reply is lost with the
    connection; `then(ids)` runs right after. The ids of that commit's jobs (claimed ones,
    with `claims_only`) fill the returned list once it happened."""
    store: Any = kernel.manager.store
    real = store._committer._write
    lost: list[str] = []

    async def reply_lost(requests: list[Any]) -> None:
        await real(requests)  # committed on the server
        ids = [r.job_id for r in requests if not claims_only or
               (r.limits is not None and not r.error)]
        if ids and not lost:
            lost.extend(ids)
            for request in requests:
                request.result, request.error = [], StoreUnavailable("connection lost")
            if then is not None:
                await then(ids)

    store._committer._write = reply_lost
    return lost


async def log_of(kernel: Kernel) -> list[StoredEvent]:
    events: list[StoredEvent] = []
    while batch := await kernel.events(after=events[-1].seq if events else 0, limit=5000):
        events += batch
    return events


def most_running(events: list[StoredEvent]) -> int:
    """The most jobs running at once, replayed from the log."""
    running: set[str] = set()
    most = 0
    for stored in events:
        if isinstance(stored.event, JobStarted):
            running.add(stored.job_id)
            most = max(most, len(running))
        elif stored.job_id in running and not isinstance(stored.event, JobStarted) and \
                type(stored.event).__name__ in ("JobCompleted", "JobFailed", "JobCancelled"):
            running.discard(stored.job_id)
    return most


async def test_two_nodes_share_the_work_and_each_job_runs_once(schema: str, tmp_path: Path
                                                              ) -> None:
    names = inputs(tmp_path, 60)
    ran_a: list[str] = []
    ran_b: list[str] = []
    async with node(schema, tmp_path, Sleep(0.02, ran_a), concurrency=None,
                    node_concurrency=3) as a, \
            node(schema, tmp_path, Sleep(0.02, ran_b), concurrency=None,
                 node_concurrency=3) as b:
        ids = [(await a.submit("wf", name)).id for name in names]
        with anyio.fail_after(60):
            for job_id in ids:
                job = await b.wait(job_id)
                assert job.status is Status.COMPLETED
        events = await log_of(a)
    assert sorted(ran_a + ran_b) == sorted(ids)  # each processor call once
    assert ran_b, "the node that did not submit took none of the work"
    completed = [s.job_id for s in events if isinstance(s.event, JobCompleted)]
    assert sorted(completed) == sorted(ids)
    assert most_running(events) <= 6
    assert len(list((tmp_path / "wf" / "archive").rglob("*.txt"))) == 60


async def test_the_cluster_wide_limit_holds_across_nodes(schema: str, tmp_path: Path) -> None:
    names = inputs(tmp_path, 30)
    # One job per node, two in the cluster: reaching 2 takes two nodes at once, and the
    # third node's free slot must stay unused. (A node may keep a slot it frees: its
    # finishing commit carries its next claim.)
    async with node(schema, tmp_path, Sleep(0.05), concurrency=2, node_concurrency=1) as a, \
            node(schema, tmp_path, Sleep(0.05), concurrency=2, node_concurrency=1) as b, \
            node(schema, tmp_path, Sleep(0.05), concurrency=2, node_concurrency=1) as c:
        ids = [(await (a, b, c)[i % 3].submit("wf", name)).id for i, name in enumerate(names)]
        with anyio.fail_after(60):
            for job_id in ids:
                assert (await a.wait(job_id)).status is Status.COMPLETED
        events = await log_of(a)
    assert most_running(events) == 2
    workers = {s.event.worker for s in events if isinstance(s.event, JobStarted)}
    assert len(workers) >= 2, workers


async def test_a_job_cancelled_on_another_node_stops_where_it_runs(schema: str, tmp_path: Path
                                                                   ) -> None:
    (name,) = inputs(tmp_path, 1)
    async with node(schema, tmp_path, Sleep(30)) as runner, \
            node(schema, tmp_path, Sleep(30)) as other:
        job = await runner.submit("wf", name)
        await until_running(other, job.id)
        await other.cancel(job.id, actor="test", reason="not needed")
        with anyio.fail_after(10):
            done = await runner.wait(job.id)
        assert done.status is Status.CANCELLED
        await until(lambda: bool(list((tmp_path / "wf" / "error").glob(f"*{name}*"))))
        assert not list((tmp_path / "wf" / "processing").iterdir())


async def test_jobs_of_a_node_whose_lease_expired_are_recovered_by_another(
        schema: str, tmp_path: Path) -> None:
    """A node that died mid-job (its claim stands, its heartbeat stopped): the job is failed
    as Interrupted once the lease runs out, and runs again elsewhere."""
    (name,) = inputs(tmp_path, 1)
    ghost = await PostgresEventStore.open(store_url(schema), node_id="ghost")
    try:
        await ghost.heartbeat(1.0)
        created = await _submit_raw(ghost, f"wf/input/{name}")
        await ghost.append(created, [JobStarted(job_id=created, at=datetime.now(UTC),
                                                attempt=1, worker="ghost")], 1)
    finally:
        await ghost._pool.close()  # dies: no leave(), the lease just runs out
    async with node(schema, tmp_path, Sleep(0.01)) as survivor:
        assert (await survivor.get_job(created)).status is Status.RUNNING  # type: ignore[union-attr]
        with anyio.fail_after(15):
            job = await survivor.wait(created)
        assert job.status is Status.COMPLETED
        events = await survivor.job_events(created)
    failed = [s.event for s in events if isinstance(s.event, JobFailed)]
    assert [f.error_type for f in failed] == ["Interrupted"]
    assert "ghost" in failed[0].message
    assert next(s.event.worker for s in events if isinstance(s.event, JobStarted)) == "ghost"


async def test_a_starting_node_leaves_the_jobs_of_live_nodes_alone(schema: str, tmp_path: Path
                                                                   ) -> None:
    (name,) = inputs(tmp_path, 1)
    async with node(schema, tmp_path, Sleep(1.5)) as first:
        job = await first.submit("wf", name)
        await until_running(first, job.id)
        async with node(schema, tmp_path, Sleep(0.01)) as second:
            await anyio.sleep(0.5)  # a few heartbeats and sweeps of the second node
            with anyio.fail_after(10):
                done = await second.wait(job.id)
    assert done.status is Status.COMPLETED
    events = await _events(schema, job.id)
    assert not [s for s in events if isinstance(s.event, JobFailed)]


async def test_a_node_that_cannot_renew_its_lease_stops_its_jobs(schema: str, tmp_path: Path
                                                                ) -> None:
    """Before its lease runs out (and another node may start the job again), a node that
    lost touch stops claiming and interrupts its own processors."""
    (name,) = inputs(tmp_path, 1)
    async with node(schema, tmp_path, Sleep(30), lease_s=1.0, heartbeat_s=0.2) as lonely:
        job = await lonely.submit("wf", name)
        await until_running(lonely, job.id)
        store: Any = lonely.store

        async def unreachable(lease_s: float) -> bool:
            raise StoreUnavailable("PostgreSQL at test is unreachable")

        store.heartbeat = unreachable
        with anyio.fail_after(5):
            while True:
                current = await lonely.store.get_job(job.id)
                assert current is not None
                if current.status is not Status.RUNNING:
                    break
                await anyio.sleep(0.05)
        assert current.error is not None and current.error.type == "Interrupted"
        assert lonely.manager.running_jobs() == []
        assert not lonely.manager.claiming or not lonely.manager._lease_ok


async def test_a_claim_on_its_way_when_the_lease_lapses_runs_once_it_is_renewed(
        schema: str, tmp_path: Path) -> None:
    """The database goes away while a claim commits, for longer than the lease: the claim
    goes through once it is back. The job must not fail as interrupted without having
    run (it used to: the lapse stopped the attempt before it started); its processor
    starts once the lease is renewed."""
    (name,) = inputs(tmp_path, 1)
    ran: list[str] = []
    async with node(schema, tmp_path, Sleep(0.02, ran), lease_s=1.0, heartbeat_s=0.2) as here:
        store: Any = here.store
        manager = here.manager
        renew, claim = store.heartbeat, store.append_claims
        down = [False]

        async def heartbeat(lease_s: float) -> bool:
            if down[0]:
                raise StoreUnavailable("PostgreSQL at test is unreachable")
            return bool(await renew(lease_s))

        async def append_claims(*args: Any) -> Any:
            down[0] = True  # the database goes away with the claim on its way
            with anyio.fail_after(5):
                while manager._lease_ok:  # noqa: ASYNC110 (the manager's own flag)
                    await anyio.sleep(0.02)
            return await claim(*args)

        store.heartbeat, store.append_claims = heartbeat, append_claims
        job = await here.submit("wf", name)
        await until_running(here, job.id)  # the claim committed, the lease lapsed
        await anyio.sleep(0.3)
        assert ran == [], "the processor started while the lease had lapsed"
        store.append_claims = claim
        down[0] = False
        with anyio.fail_after(10):
            done = await here.wait(job.id)
    assert done.status is Status.COMPLETED and done.attempts == 1
    assert ran == [job.id]
    assert not [s for s in await _events(schema, job.id) if isinstance(s.event, JobFailed)]


async def test_an_old_event_read_late_does_not_stop_a_newer_attempt(schema: str, tmp_path: Path
                                                                   ) -> None:
    """The follower may lag: a JobFailed of the previous attempt, read after this node
    claimed the retry, says nothing about the attempt running now."""
    (name,) = inputs(tmp_path, 1)
    async with node(schema, tmp_path, Sleep(30)) as here:
        job = await here.submit("wf", name)
        await until_running(here, job.id)
        (attempt,) = [a for a in here.manager._running.values() if a.job.id == job.id]
        now = datetime.now(UTC)
        stale = StoredEvent(seq=1, job_id=job.id, version=attempt.job.version, event=JobFailed(
            job_id=job.id, at=now, attempt=0, error_type="Interrupted", message="old",
            retry_at=now))
        await here.manager._foreign(stale)
        assert attempt.stop_reason is None
        newer = StoredEvent(seq=99, job_id=job.id, version=attempt.job.version + 1,
                            event=JobCancelled(job_id=job.id, at=now, actor="elsewhere"))
        await here.manager._foreign(newer)
        assert attempt.stop_reason == "cancel"


async def test_recovering_an_orphan_never_fails_the_attempt_that_replaced_it(
        schema: str, tmp_path: Path) -> None:
    """Two nodes see the same dead node's job; the first recovers it and a live node
    claims it again: the second node's recovery is refused, the new attempt runs on."""
    (name,) = inputs(tmp_path, 1)
    raw = await PostgresEventStore.open(store_url(schema), node_id="raw")
    try:
        job_id = await _submit_raw(raw, f"wf/input/{name}")
        now = datetime.now(UTC)
        await raw.append(job_id, [JobStarted(job_id=job_id, at=now, attempt=1,
                                             worker="ghost")], 1)
        orphan = await raw.get_job(job_id)
        await raw.append(job_id, [
            JobFailed(job_id=job_id, at=now, attempt=1, error_type="Interrupted",
                      message="recovered by a faster node", retry_at=now),
            JobStarted(job_id=job_id, at=now, attempt=2, worker="raw")], 2)
        await raw.heartbeat(30)  # "raw" is alive: its attempt 2 must stand
        async with node(schema, tmp_path, Sleep(0.01)) as late:
            assert orphan is not None
            with pytest.raises(Rejected):
                await late.manager._interrupt(orphan, WorkflowConfig())
            current = await late.store.get_job(job_id)
        assert current is not None
        assert current.status is Status.RUNNING and current.attempts == 2
    finally:
        await raw._pool.close()


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 (a file system condition: nothing to wait on)
            await anyio.sleep(0.02)


async def until_running(kernel: Kernel, job_id: str) -> None:
    with anyio.fail_after(10):
        while True:
            job = await kernel.get_job(job_id)
            if job is not None and job.status is Status.RUNNING:
                return
            await anyio.sleep(0.02)


async def _submit_raw(store: PostgresEventStore, file_path: str) -> str:
    from kernel.events import JobCreated

    job_id = "01GHOSTJOB00000000000000000"
    await store.append(job_id, [JobCreated(job_id=job_id, at=datetime.now(UTC),
                                           workflow_name="wf", file_path=file_path)], 0)
    return job_id


async def _events(schema: str, job_id: str) -> list[StoredEvent]:
    store = await PostgresEventStore.open(store_url(schema))
    try:
        return await store.read_job(job_id)
    finally:
        await store.close()


async def test_a_lost_claim_reads_the_log_only_when_the_follower_is_behind(
        schema: str, tmp_path: Path) -> None:
    # The follower usually holds the winner's event by the time a claim's conflict comes
    # back: then the job is not read again (one query per lost race, with 3 nodes racing).
    async with node(schema, tmp_path, Sleep(0.01)) as here:
        manager = here.manager
        await manager.drain(0)  # claims nothing from here on: the queue stays as we set it
        job = await here.submit("wf", inputs(tmp_path, 1)[0])
        await queued(manager, job.id)  # through its intake: nothing else will queue it
        reads: list[str] = []
        real_get_job = manager.store.get_job

        async def counted_get_job(job_id: str) -> Any:
            reads.append(job_id)
            return await real_get_job(job_id)

        manager.store.get_job = counted_get_job  # type: ignore[method-assign]
        pending = manager._jobs[job.id]
        manager.queue.discard(job.id)

        # Started (and ended) elsewhere: the follower dropped the job; nothing to read.
        del manager._jobs[job.id]
        await manager._refresh_pending(job.id, pending.version)
        assert reads == [] and job.id not in manager.queue
        # Changed elsewhere and pending again (a newer version than we claimed at): queued.
        manager._jobs[job.id] = pending
        await manager._refresh_pending(job.id, pending.version - 1)
        await queued(manager, job.id)  # (through the intake checks: a first attempt)
        assert reads == []
        # The follower still holds the version we claimed at: the log is read.
        manager.queue.discard(job.id)
        await manager._refresh_pending(job.id, pending.version)
        await queued(manager, job.id)
        assert reads == [job.id]


async def queued(manager: Any, job_id: str) -> None:
    with anyio.fail_after(10):
        while job_id not in manager.queue:  # noqa: ASYNC110 (the manager's own queue)
            await anyio.sleep(0.01)


async def test_the_follower_waits_out_an_outage_rather_than_lose_a_pending_job(
        schema: str, tmp_path: Path) -> None:
    # Another node's JobFailed (with a retry) of a job this node no longer holds makes the
    # follower read the job; while the store is away that read is retried, not skipped,
    # or the job would never be queued here again (a lost claim trusts the follower).
    async with node(schema, tmp_path, Sleep(0.01)) as here:
        manager = here.manager
        await manager.drain(0)
        job = await here.submit("wf", inputs(tmp_path, 1)[0])
        await queued(manager, job.id)
        manager.queue.discard(job.id)
        del manager._jobs[job.id]  # as when the follower saw it start elsewhere
        real_get_job = manager.store.get_job
        outage = [StoreUnavailable("the database went away"), StoreUnavailable("still away")]

        async def flaky_get_job(job_id: str) -> Any:
            if outage:
                raise outage.pop(0)
            return await real_get_job(job_id)

        manager.store.get_job = flaky_get_job  # type: ignore[method-assign]
        now = datetime.now(UTC)
        failed = StoredEvent(seq=99, job_id=job.id, version=job.version + 2, event=JobFailed(
            job_id=job.id, at=now, attempt=1, error_type="Interrupted", message="elsewhere",
            retry_at=now))
        with anyio.fail_after(10):
            await manager._foreign(failed)
        assert outage == []
        await queued(manager, job.id)


async def test_a_claim_that_committed_although_the_store_said_it_failed_is_recovered(
        schema: str, tmp_path: Path) -> None:
    """The claim's COMMIT lands, the reply is lost with the connection: the node is told
    the claim failed and never starts the job, which the log shows running on this live
    node. Its heartbeat recovers it like a dead node's (Interrupted, then retried), so it
    does not hold the cluster's only slot (concurrency 1, the default) for ever."""
    names = inputs(tmp_path, 2)
    async with node(schema, tmp_path, Sleep(0.01)) as a, \
            node(schema, tmp_path, Sleep(0.01)) as b:
        await b.manager.drain(0)  # b only submits: every claim is a's
        lost = lose_first_reply(a)
        first = await a.submit("wf", names[0])
        second = await b.submit("wf", names[1])
        with anyio.fail_after(30):
            done = [await b.wait(job.id) for job in (first, second)]
        failures = [s.event for s in await log_of(b) if s.job_id == first.id
                    and isinstance(s.event, JobFailed)]
    assert lost == [first.id]
    assert [job.status for job in done] == [Status.COMPLETED, Status.COMPLETED]
    assert done[0].attempts == 2  # the stranded attempt counts, as any interrupted one
    assert [f.error_type for f in failures] == ["Interrupted"]


async def test_a_submit_that_committed_although_the_store_said_it_failed_runs_when_resent(
        schema: str, tmp_path: Path) -> None:
    """The JobCreated lands, the reply is lost: the caller sees an error and submits the
    file again, which returns the job made the first time (never a second one), and that
    job runs, although this node never learnt of it (its follower skips its own events)."""
    (name,) = inputs(tmp_path, 1)
    async with node(schema, tmp_path, Sleep(0.01)) as a:
        lost = lose_first_reply(a, claims_only=False)
        with pytest.raises(StoreUnavailable):
            await a.submit("wf", name)
        again = await a.submit_file("wf", name)
        assert not again.created and [again.job.id] == lost
        with anyio.fail_after(20):
            done = await a.wait(again.job.id)
    assert done.status is Status.COMPLETED


async def test_a_cancel_landing_between_a_claim_and_its_start_stops_the_job(
        schema: str, tmp_path: Path) -> None:
    """Another node cancels a job just after this node's claim of it committed, and this
    node's follower sees the cancel before the claim's result is handled (a busy loop):
    the processor never runs, and the file ends in error/ with the cancel's report."""
    (name,) = inputs(tmp_path, 1)
    ran: list[str] = []
    async with node(schema, tmp_path, Sleep(3.0, ran)) as a, \
            node(schema, tmp_path, Sleep(3.0)) as c:
        await c.manager.drain(0)  # c only cancels
        real = a.manager.store.append_claims
        cancelled = anyio.Event()
        job_ids: list[str] = []

        async def handled_late(appends: Any, candidates: Any, limits: Any) -> Any:
            result = await real(appends, candidates, limits)
            if candidates and not cancelled.is_set():
                await c.cancel(job_ids[0], actor="test", reason="stop it")
                cancelled.set()
                await anyio.sleep(1.0)  # a's follower sees the cancel meanwhile
            return result

        a.manager.store.append_claims = handled_late  # type: ignore[method-assign]
        job = await c.submit("wf", name)
        job_ids.append(job.id)
        with anyio.fail_after(20):
            await cancelled.wait()
            done = await c.wait(job.id)
            await a.wait(job.id)  # its file settled by a, whose claim the log shows
        await anyio.sleep(3.5)  # as long as the processor would have run
        log = await log_of(c)
    assert done.status is Status.CANCELLED
    assert ran == []
    assert len(list((tmp_path / "wf" / "error").glob(f"*{name}"))) == 1
    assert [type(s.event).__name__ for s in log if s.job_id == job.id] == [
        "JobCreated", "JobStarted", "JobCancelled"]
    assert not list((tmp_path / "wf" / "input").iterdir())
    assert not list((tmp_path / "wf" / "processing").iterdir())


async def test_a_job_finishing_through_a_database_blip_is_not_taken_for_an_orphan(
        schema: str, tmp_path: Path) -> None:
    """Between an attempt's end and the commit of its outcome (retried while the database
    is away) the log still shows the job running here: its node's heartbeat must not take
    it for a lost claim and interrupt it. It completes, once, in its one attempt."""
    (name,) = inputs(tmp_path, 1)
    ran: list[str] = []
    async with node(schema, tmp_path, Sleep(0.5, ran)) as here:
        store: Any = here.manager.store
        down = [False]
        real = {n: getattr(store, n) for n in ("heartbeat", "append_batch", "append_claims")}

        def blinking(method: str) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                if down[0]:
                    raise StoreUnavailable("a blip")
                return await real[method](*args, **kwargs)
            return call

        for method in real:
            setattr(store, method, blinking(method))
        job = await here.submit("wf", name)
        await until_running(here, job.id)
        down[0] = True
        await anyio.sleep(2.0)  # the attempt ends meanwhile; its outcome waits
        down[0] = False
        with anyio.fail_after(20):
            done = await here.wait(job.id)
    assert (done.status, done.attempts, ran) == (Status.COMPLETED, 1, [job.id])


async def test_a_retry_made_elsewhere_while_a_claim_is_on_its_way_still_runs(
        schema: str, tmp_path: Path) -> None:
    """While this node's claim is on its way, another node starts the job and fails it
    with a retry: this node's claim conflicts, and the job, pending again, is run."""
    (name,) = inputs(tmp_path, 1)
    ran: list[str] = []
    other = await PostgresEventStore.open(store_url(schema), node_id="other")
    await other.heartbeat(60)
    try:
        async with node(schema, tmp_path, Sleep(0.01, ran)) as a:
            real = a.manager.store.append_claims
            raced: list[str] = []

            async def overtaken(appends: Any, candidates: Any, limits: Any) -> Any:
                if candidates and not raced:
                    first = candidates[0]
                    raced.append(first.job_id)
                    now = datetime.now(UTC)
                    await other.append(first.job_id, [JobStarted(
                        job_id=first.job_id, at=now, attempt=1, worker="other")],
                        first.expected_version)
                    await other.append(first.job_id, [JobFailed(
                        job_id=first.job_id, at=now, attempt=1, error_type="Boom",
                        message="x", retry_at=now)], first.expected_version + 1)
                    await anyio.sleep(0.5)  # a's follower reads both meanwhile
                return await real(appends, candidates, limits)

            a.manager.store.append_claims = overtaken  # type: ignore[method-assign]
            job = await a.submit("wf", name)
            with anyio.fail_after(20):
                done = await a.wait(job.id)
    finally:
        await other.close()
    assert raced == [job.id]
    assert (done.status, done.attempts, ran) == (Status.COMPLETED, 2, [job.id])


async def test_a_lost_claim_cancelled_elsewhere_has_its_file_moved_by_its_node(
        schema: str, tmp_path: Path) -> None:
    """A claim commits but its node is told it failed; another node then cancels the job,
    which the log shows running on the first, and leaves the file to it: the first node's
    heartbeat moves it to error/ (it never ran the processor)."""
    (name,) = inputs(tmp_path, 1)
    ran: list[str] = []
    async with node(schema, tmp_path, Sleep(0.01, ran)) as a, \
            node(schema, tmp_path, Sleep(0.01)) as c:
        await c.manager.drain(0)  # c only cancels
        lost = lose_first_reply(
            a, then=lambda ids: c.cancel(ids[0], actor="test", reason="not this one"))
        job = await c.submit("wf", name)
        with anyio.fail_after(20):
            while not list((tmp_path / "wf" / "error").glob(f"*{name}")):  # noqa: ASYNC110
                await anyio.sleep(0.05)  # (a file is awaited, not an event)
        done = await c.get_job(job.id)
    assert lost == [job.id] and ran == []
    assert done is not None and done.status is Status.CANCELLED
    assert not list((tmp_path / "wf" / "input").iterdir())


async def test_a_lost_claim_is_recovered_while_the_node_is_busy_with_another_job(
        schema: str, tmp_path: Path) -> None:
    """The node that lost a claim's reply has its one slot taken by another job, so it
    never picks the stranded job again: its heartbeat recovers it all the same (its own
    pending copy of the job, older than the log's, does not stand in the way)."""
    first, second = inputs(tmp_path, 2)
    ran: list[str] = []
    async with node(schema, tmp_path, Sleep(3.0, ran), node_concurrency=1) as a:
        lost = lose_first_reply(a)
        stranded = await a.submit("wf", first)
        with anyio.fail_after(10):
            while not lost:  # noqa: ASYNC110
                await anyio.sleep(0.02)  # (the claim, not an event, is awaited)
        busy = await a.submit("wf", second, priority=10)  # takes the slot after the pause
        await until_running(a, busy.id)
        with anyio.fail_after(10):
            while True:
                failures = [s.event for s in await log_of(a) if s.job_id == stranded.id
                            and isinstance(s.event, JobFailed)]
                if failures:
                    break
                await anyio.sleep(0.1)
        still = await a.get_job(busy.id)
    assert lost == [stranded.id]
    assert [f.error_type for f in failures] == ["Interrupted"]
    assert still is not None and still.status is Status.RUNNING  # recovered meanwhile
