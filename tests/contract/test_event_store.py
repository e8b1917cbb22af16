"""The EventStore contract: every store (memory, SQLite, later Postgres) must pass it.

Two independent oracles: the read model must equal `kernel.state.replay` of the
stored log, and every stored hash must verify with `kernel.chain.verify`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.chain import ChainRow, verify
from kernel.decide import (
    AnyCommand,
    CancelJob,
    CompleteJob,
    CreateJob,
    FailJob,
    RefuseAtIntake,
    Rejected,
    ReportProgress,
    RetryJob,
    StartJob,
    decide,
)
from kernel.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobProgress,
    JobRetried,
    JobStarted,
    encode_event,
    event_tag,
)
from kernel.ports import (
    Append,
    ConcurrencyConflict,
    DuplicateJob,
    EventStore,
    JobQuery,
    NotClaimed,
    StoreError,
    StoreUnavailable,
)
from kernel.state import Job, Status, StoredEvent, replay

if TYPE_CHECKING:
    from tests.contract.conftest import FreshStore, OpenStore, Reopen

pytestmark = pytest.mark.anyio

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
WF = "invoices"
EVERYTHING = 10**9


# -- events and helpers --------------------------------------------------------------


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def created(
    job_id: str,
    t: float = 0,
    *,
    wf: str = WF,
    name: str = "a.pdf",
    path: str | None = None,
    channel: str | None = None,
    key: str | None = None,
) -> JobCreated:
    return JobCreated(
        job_id=job_id,
        at=at(t),
        workflow_name=wf,
        file_path=path or f"{wf}/input/{name}",
        channel_name=channel,
        priority=3,
        params={"pages": [1, 2], "title": "Grüße ✓", "scale": 0.1},
        idempotency_key=key,
    )


def started(job_id: str, t: float = 1, attempt: int = 1, worker: str = "w") -> JobStarted:
    return JobStarted(job_id=job_id, at=at(t), attempt=attempt, worker=worker)


def progressed(job_id: str, t: float = 2) -> JobProgress:
    return JobProgress(job_id=job_id, at=at(t), fraction=0.5, message="half")


def completed(job_id: str, t: float = 3, attempt: int = 1) -> JobCompleted:
    return JobCompleted(
        job_id=job_id, at=at(t), attempt=attempt, result={"ok": True}, output_paths=["o/x.txt"]
    )


def failed(
    job_id: str, t: float = 3, attempt: int = 1, retry_at: datetime | None = None
) -> JobFailed:
    return JobFailed(
        job_id=job_id, at=at(t), error_type="ValueError", message="boom", traceback="tb",
        attempt=attempt, retry_at=retry_at,
    )


def cancelled(job_id: str, t: float = 3) -> JobCancelled:
    return JobCancelled(job_id=job_id, at=at(t), actor="cli", reason="test")


def retried(job_id: str, t: float = 4) -> JobRetried:
    return JobRetried(job_id=job_id, at=at(t), actor="cli", reason="again")


ENDINGS: dict[str, Callable[[str], list[Event]]] = {
    "completed": lambda job_id: [started(job_id), completed(job_id)],
    "failed_finally": lambda job_id: [started(job_id), failed(job_id)],
    "refused_at_intake": lambda job_id: [failed(job_id, attempt=0)],
    "cancelled": lambda job_id: [cancelled(job_id)],
}
STILL_ACTIVE: dict[str, Callable[[str], list[Event]]] = {
    "pending": lambda job_id: [],
    "running": lambda job_id: [started(job_id)],
    "waiting_for_retry": lambda job_id: [started(job_id), failed(job_id, retry_at=at(60))],
}


async def create(store: EventStore, job_id: str, **kwargs: object) -> list[StoredEvent]:
    return await store.append(job_id, [created(job_id, **kwargs)], 0)  # type: ignore[arg-type]


async def advance(store: EventStore, job_id: str, events: list[Event]) -> list[StoredEvent]:
    """Append events to a job at its current version."""
    job = await store.get_job(job_id)
    assert job is not None
    return await store.append(job_id, events, job.version) if events else []


async def whole_log(store: EventStore) -> list[StoredEvent]:
    return await store.read_all(0, EVERYTHING)


def assert_gapless(log: list[StoredEvent], first: int = 1) -> None:
    assert [stored.seq for stored in log] == list(range(first, first + len(log)))


def assert_chain(log: list[StoredEvent]) -> None:
    rows = [
        ChainRow(s.seq, s.job_id, s.version, event_tag(s.event), encode_event(s.event), s.hash)
        for s in log
    ]
    report = verify(rows)
    assert report.ok, (report.first_bad_seq, report.reason)
    assert report.checked == len(log)


async def assert_nothing_written(store: EventStore, before: list[StoredEvent]) -> None:
    assert await store.last_seq() == (before[-1].seq if before else 0)
    assert await whole_log(store) == before


async def assert_read_model_is_replay(store: EventStore) -> None:
    """Every read-model query agrees with the fold of the stored log."""
    log = await whole_log(store)
    assert_gapless(log)
    oracle = replay(log)
    for job_id, job in oracle.items():
        assert await store.get_job(job_id) == job
        assert await store.read_job(job_id) == [s for s in log if s.job_id == job_id]
    oldest_first = sorted(oracle.values(), key=lambda job: job.created_seq)
    active = [job for job in oldest_first if job.is_active]
    owners = Counter((job.workflow_name, job.file_path) for job in active)
    assert all(n == 1 for n in owners.values()), "two active jobs own one file"
    assert await store.active_jobs() == active
    for wf in {job.workflow_name for job in oldest_first}:
        assert await store.active_jobs(wf) == [job for job in active if job.workflow_name == wf]
        for path in {job.file_path for job in oldest_first}:
            owner = [a for a in active if (a.workflow_name, a.file_path) == (wf, path)]
            assert await store.find_active(wf, path) == (owner[0] if owner else None)
    keyed = [job for job in oldest_first if job.idempotency_key is not None]
    assert len({(job.workflow_name, job.idempotency_key) for job in keyed}) == len(keyed)
    for job in keyed:
        assert await store.find_by_key(job.workflow_name, job.idempotency_key or "") == job
    counts = Counter((job.workflow_name, str(job.status)) for job in oldest_first)
    assert await store.count_jobs() == dict(counts)
    page = await store.list_jobs(JobQuery(limit=len(oracle) + 1))
    assert page.items == oldest_first[::-1]
    assert page.next_cursor is None
    assert_chain(log)


@asynccontextmanager
async def tailing(store: EventStore, after: int) -> AsyncIterator[AsyncIterator[StoredEvent]]:
    """A tail iterator that is closed on exit."""
    iterator = store.tail(after)
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


# -- append and read back --------------------------------------------------------------


async def test_empty_store_has_nothing(store: EventStore) -> None:
    """A new store has an empty log and an empty read model."""
    assert await store.last_seq() == 0
    assert await whole_log(store) == []
    assert await store.read_job("nope") == []
    assert await store.get_job("nope") is None
    assert await store.find_active(WF, f"{WF}/input/a.pdf") is None
    assert await store.find_by_key(WF, "k") is None
    assert await store.active_jobs() == []
    assert await store.count_jobs() == {}
    page = await store.list_jobs(JobQuery())
    assert page.items == [] and page.next_cursor is None


async def test_append_stores_events_with_seq_version_and_hash(store: EventStore) -> None:
    """Append returns each event with the next global seq, the next job version and a hash."""
    first = await create(store, "A")
    rest = await store.append("A", [started("A"), progressed("A"), completed("A")], 1)
    stored = first + rest
    assert [(s.seq, s.job_id, s.version) for s in stored] == [(n, "A", n) for n in (1, 2, 3, 4)]
    sent = [created("A"), started("A"), progressed("A"), completed("A")]
    assert [s.event for s in stored] == sent
    assert len({s.hash for s in stored}) == 4
    assert await store.last_seq() == 4


async def test_read_back_equals_what_append_returned(store: EventStore) -> None:
    """read_job and read_all return exactly the StoredEvents that append returned."""
    a = await create(store, "A", name="a.pdf")
    b = await create(store, "B", name="b.pdf")
    a += await store.append("A", [started("A")], 1)
    b += await store.append("B", [cancelled("B")], 1)
    a += await store.append("A", [completed("A")], 2)
    assert await store.read_job("A") == a
    assert await store.read_job("B") == b
    assert await whole_log(store) == sorted(a + b, key=lambda s: s.seq)


async def test_seq_is_global_and_version_is_per_job(store: EventStore) -> None:
    """Interleaved appends get a gapless global seq and per-job versions from 1."""
    for round_ in range(3):
        for job_id in ("A", "B", "C"):
            if round_ == 0:
                await create(store, job_id, name=f"{job_id}.pdf")
            else:
                await advance(store, job_id, [progressed(job_id, t=round_)])
    log = await whole_log(store)
    assert_gapless(log)
    assert len(log) == 9
    for job_id in ("A", "B", "C"):
        assert [s.version for s in await store.read_job(job_id)] == [1, 2, 3]


async def test_read_all_pages_with_after_and_limit(store: EventStore) -> None:
    """read_all returns at most `limit` events with seq > `after`, in seq order."""
    for i in range(10):
        await create(store, f"J{i}", name=f"{i}.pdf")
    assert [s.seq for s in await store.read_all(3, 4)] == [4, 5, 6, 7]
    assert [s.seq for s in await store.read_all(8, 100)] == [9, 10]
    assert await store.read_all(10, 100) == []
    assert [s.seq for s in await store.read_all()] == list(range(1, 11))
    pages, after = [], 0
    while page := await store.read_all(after, 3):
        pages.append([s.seq for s in page])
        after = page[-1].seq
    assert pages == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]


# -- expected_version ------------------------------------------------------------------


@pytest.mark.parametrize("expected", [0, 1, 3])
async def test_wrong_expected_version_conflicts_and_writes_nothing(
    store: EventStore, expected: int
) -> None:
    """An append at a version the job is not at raises ConcurrencyConflict and stores nothing."""
    await create(store, "A")
    await store.append("A", [started("A")], 1)
    before = await whole_log(store)
    job = await store.get_job("A")
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.append("A", [completed("A")], expected)
    assert (caught.value.job_id, caught.value.expected, caught.value.actual) == ("A", expected, 2)
    await assert_nothing_written(store, before)
    assert await store.get_job("A") == job


async def test_unknown_job_is_at_version_zero(store: EventStore) -> None:
    """Appending to a job that does not exist at a version above 0 conflicts with actual 0."""
    with pytest.raises(ConcurrencyConflict) as caught:
        await store.append("ghost", [started("ghost")], 1)
    assert (caught.value.expected, caught.value.actual) == (1, 0)
    await assert_nothing_written(store, [])
    assert await store.get_job("ghost") is None


async def test_creating_an_existing_job_id_conflicts(store: EventStore) -> None:
    """A second JobCreated for an existing job id at version 0 is a ConcurrencyConflict."""
    await create(store, "A", name="a.pdf")
    before = await whole_log(store)
    with pytest.raises(ConcurrencyConflict):
        await create(store, "A", name="other.pdf")
    await assert_nothing_written(store, before)


async def test_recreating_a_finished_job_id_is_refused_alone(store: EventStore) -> None:
    """A JobCreated at version 0 for the id of a finished job conflicts (actual 3), while
    the new jobs appended beside it land: ids of finished jobs are not kept in memory."""
    await create(store, "A", name="a.pdf")
    await advance(store, "A", [started("A"), completed("A")])
    results = await store.append_batch([
        Append("B", [created("B", name="b.pdf")], 0),
        Append("A", [created("A", name="again.pdf")], 0),
        Append("C", [created("C", name="c.pdf")], 0),
    ])
    b, a, c = results
    assert isinstance(a, ConcurrencyConflict) and (a.expected, a.actual) == (0, 3)
    assert not isinstance(b, StoreError) and not isinstance(c, StoreError)
    assert [(s.job_id, s.version) for s in b + c] == [("B", 1), ("C", 1)]
    assert_gapless(await whole_log(store))
    assert (await store.get_job("A")).status is Status.COMPLETED  # type: ignore[union-attr]
    await assert_read_model_is_replay(store)
    with pytest.raises(ConcurrencyConflict):  # alone in its group too
        await create(store, "A", name="again.pdf")


# -- one active job per file, idempotency keys ----------------------------------------------


@pytest.mark.parametrize("state", list(STILL_ACTIVE))
async def test_second_job_for_an_active_file_is_a_duplicate(store: EventStore, state: str) -> None:
    """JobCreated for a file with an active job raises DuplicateJob naming it and stores nothing."""
    await create(store, "A")
    await advance(store, "A", STILL_ACTIVE[state]("A"))
    before = await whole_log(store)
    with pytest.raises(DuplicateJob) as caught:
        await create(store, "B", t=10)
    assert caught.value.existing_job_id == "A"
    await assert_nothing_written(store, before)
    assert await store.get_job("B") is None
    assert await store.read_job("B") == []
    assert (await store.find_active(WF, f"{WF}/input/a.pdf")).id == "A"  # type: ignore[union-attr]


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_file_is_free_again_once_its_job_ends(store: EventStore, ending: str) -> None:
    """After a job completes, fails finally or is cancelled, a new job for its file is accepted."""
    await create(store, "A")
    await advance(store, "A", ENDINGS[ending]("A"))
    assert await store.find_active(WF, f"{WF}/input/a.pdf") is None
    await create(store, "B", t=10)
    assert (await store.find_active(WF, f"{WF}/input/a.pdf")).id == "B"  # type: ignore[union-attr]


async def test_same_file_path_in_another_workflow_is_not_a_duplicate(store: EventStore) -> None:
    """The one-active-job rule is per (workflow, file_path)."""
    await create(store, "A", wf="alpha", path="shared/a.pdf")
    await create(store, "B", wf="beta", path="shared/a.pdf")
    assert (await store.find_active("alpha", "shared/a.pdf")).id == "A"  # type: ignore[union-attr]
    assert (await store.find_active("beta", "shared/a.pdf")).id == "B"  # type: ignore[union-attr]


@pytest.mark.parametrize("state", ["pending", *ENDINGS])
async def test_reused_idempotency_key_is_a_duplicate_forever(store: EventStore, state: str) -> None:
    """A reused (workflow, idempotency_key) raises DuplicateJob, even after the first job ended."""
    await create(store, "A", name="a.pdf", key="k1")
    await advance(store, "A", ENDINGS.get(state, STILL_ACTIVE["pending"])("A"))
    before = await whole_log(store)
    with pytest.raises(DuplicateJob) as caught:
        await create(store, "B", name="b.pdf", key="k1", t=10)
    assert caught.value.existing_job_id == "A"
    await assert_nothing_written(store, before)
    assert (await store.find_by_key(WF, "k1")).id == "A"  # type: ignore[union-attr]


async def test_idempotency_key_is_scoped_by_workflow(store: EventStore) -> None:
    """The same idempotency key in two workflows names two jobs."""
    await create(store, "A", wf="alpha", key="k1")
    await create(store, "B", wf="beta", key="k1")
    assert (await store.find_by_key("alpha", "k1")).id == "A"  # type: ignore[union-attr]
    assert (await store.find_by_key("beta", "k1")).id == "B"  # type: ignore[union-attr]


@pytest.mark.parametrize("ending", ["failed_finally", "refused_at_intake", "cancelled"])
async def test_retry_while_another_job_holds_the_file_is_a_duplicate(
    store: EventStore, ending: str
) -> None:
    """Retrying an ended job while another active job holds its file raises DuplicateJob."""
    await create(store, "A")
    await advance(store, "A", ENDINGS[ending]("A"))
    await create(store, "B", t=10)
    before = await whole_log(store)
    ended = await store.get_job("A")
    with pytest.raises(DuplicateJob) as caught:
        await advance(store, "A", [retried("A", t=11)])
    assert caught.value.existing_job_id == "B"
    await assert_nothing_written(store, before)
    assert await store.get_job("A") == ended
    await advance(store, "B", [cancelled("B", t=12)])
    await advance(store, "A", [retried("A", t=13)])
    assert (await store.find_active(WF, f"{WF}/input/a.pdf")).id == "A"  # type: ignore[union-attr]
    await assert_read_model_is_replay(store)


# -- atomic batches ------------------------------------------------------------------


async def test_batch_with_a_version_conflict_stores_none_of_it(store: EventStore) -> None:
    """A multi-event append at a stale version stores none of its events."""
    await create(store, "A")
    await store.append("A", [started("A")], 1)
    before = await whole_log(store)
    with pytest.raises(ConcurrencyConflict):
        await store.append("A", [progressed("A"), completed("A"), cancelled("A")], 1)
    await assert_nothing_written(store, before)


async def test_batch_starting_with_a_duplicate_stores_none_of_it(store: EventStore) -> None:
    """A JobCreated+JobStarted batch for a busy file stores neither event nor a job."""
    await create(store, "A")
    before = await whole_log(store)
    with pytest.raises(DuplicateJob):
        await store.append("B", [created("B", t=5), started("B", t=6)], 0)
    await assert_nothing_written(store, before)
    assert await store.get_job("B") is None


async def test_batch_refused_on_a_later_event_stores_none_of_it(store: EventStore) -> None:
    """When the second event of a batch is refused, the first one is not stored either."""
    await create(store, "A")
    await advance(store, "A", ENDINGS["failed_finally"]("A"))
    await create(store, "B", t=10)
    before = await whole_log(store)
    job = await store.get_job("A")
    with pytest.raises(DuplicateJob):
        await advance(store, "A", [progressed("A", t=11), retried("A", t=12)])
    await assert_nothing_written(store, before)
    assert await store.get_job("A") == job


async def test_batch_gets_consecutive_seqs_and_one_read_model_update(store: EventStore) -> None:
    """A whole lifecycle appended as one batch lands with consecutive seqs and the folded row."""
    stored = await store.append("A", [created("A"), started("A"), completed("A")], 0)
    assert [(s.seq, s.version) for s in stored] == [(1, 1), (2, 2), (3, 3)]
    job = await store.get_job("A")
    assert job is not None and job.status is Status.COMPLETED and job.version == 3
    assert (job.seq, job.created_seq) == (3, 1)
    await assert_read_model_is_replay(store)


# -- append_batch ----------------------------------------------------------------------


async def test_append_batch_appends_succeed_or_fail_each_on_its_own(store: EventStore) -> None:
    """In one append_batch, refused appends store nothing and the others land gaplessly."""
    await create(store, "A", name="a.pdf")
    results = await store.append_batch([
        Append("B", [created("B", name="b.pdf")], 0),
        Append("C", [created("C", name="a.pdf")], 0),  # A holds a.pdf
        Append("A", [completed("A")], 7),
        Append("D", [created("D", name="d.pdf", key="k")], 0),
    ])
    b, c, a, d = results
    assert isinstance(c, DuplicateJob) and c.existing_job_id == "A"
    assert isinstance(a, ConcurrencyConflict) and (a.expected, a.actual) == (7, 1)
    assert not isinstance(b, StoreError) and not isinstance(d, StoreError)
    assert [(s.job_id, s.version) for s in b + d] == [("B", 1), ("D", 1)]
    assert (await whole_log(store))[1:] == sorted(b + d, key=lambda s: s.seq)
    assert await store.get_job("C") is None
    await assert_read_model_is_replay(store)


async def test_an_event_that_cannot_be_encoded_is_refused_alone(store: EventStore) -> None:
    """A result nested past the recursion limit (a hostile file's parse tree) refuses its
    own append with a StoreError; the appends beside it are stored (it failed the whole
    group, reported as the store being unavailable, and was retried for ever)."""
    tree: list[object] = []
    for _ in range(5000):
        tree = [tree]
    await create(store, "A", name="a.pdf")
    await store.append("A", [started("A")], 1)
    deep = JobCompleted(job_id="A", at=at(3), attempt=1, result={"tree": tree})
    b, a = await store.append_batch([Append("B", [created("B", name="b.pdf")], 0),
                                     Append("A", [deep], 2)])
    assert isinstance(a, StoreError) and not isinstance(a, StoreUnavailable)
    assert "cannot be stored" in str(a)
    assert not isinstance(b, StoreError)
    assert (await store.get_job("A")).status is Status.RUNNING  # type: ignore[union-attr]
    await assert_read_model_is_replay(store)


async def test_an_append_if_all_before_is_stored_only_after_them(store: EventStore) -> None:
    """`Append.if_all_before`: stored only if every unmarked append before it in its batch
    was; else refused with NotClaimed, and nothing of it written."""
    await create(store, "A", name="a.pdf")
    await create(store, "B", name="b.pdf")
    await create(store, "C", name="c.pdf")
    refused = await store.append_batch([
        Append("A", [started("A")], 7),  # a conflict
        Append("B", [started("B")], 1, if_all_before=True),
    ])
    assert isinstance(refused[0], ConcurrencyConflict)
    assert isinstance(refused[1], NotClaimed)
    assert (await store.get_job("B")).status is Status.PENDING  # type: ignore[union-attr]
    stored = await store.append_batch([
        Append("A", [started("A")], 1),
        Append("B", [started("B")], 1, if_all_before=True),
        Append("C", [started("C")], 7, if_all_before=True),  # its own conflict
    ])
    assert not isinstance(stored[0], StoreError) and not isinstance(stored[1], StoreError)
    assert isinstance(stored[2], ConcurrencyConflict)
    await assert_read_model_is_replay(store)


async def test_append_batch_sees_the_appends_before_it_in_the_batch(store: EventStore) -> None:
    """Later appends of a batch see earlier ones: a freed file, a used key, a new version."""
    await create(store, "A", name="a.pdf")
    await advance(store, "A", [started("A")])
    results = await store.append_batch([
        Append("A", [completed("A")], 2),
        Append("B", [created("B", name="a.pdf", key="k")], 0),  # A just freed a.pdf
        Append("B", [started("B")], 1),
        Append("C", [created("C", name="c.pdf", key="k")], 0),  # B just used k
        Append("B", [progressed("B")], 1),  # B is at 2 by now
    ])
    assert not any(isinstance(r, StoreError) for r in results[:3])
    assert isinstance(results[3], DuplicateJob) and results[3].existing_job_id == "B"
    assert isinstance(results[4], ConcurrencyConflict) and results[4].actual == 2
    assert (await store.find_active(WF, f"{WF}/input/a.pdf")).id == "B"  # type: ignore[union-attr]
    await assert_read_model_is_replay(store)


# -- concurrency -----------------------------------------------------------------------


async def run_lifecycle(store: EventStore, job_id: str) -> None:
    await store.append(job_id, [created(job_id, name=f"{job_id}.pdf")], 0)
    await store.append(job_id, [started(job_id)], 1)
    await store.append(job_id, [completed(job_id)], 2)


async def test_concurrent_appends_to_many_jobs_all_succeed(store: EventStore) -> None:
    """200 jobs created and run concurrently get a gapless seq, versions 1..3 and a valid chain."""
    job_ids = [f"job-{i:03d}" for i in range(200)]
    writers_done = anyio.Event()

    async def watch_prefix() -> None:
        # Readers never see seq N+1 before N, even mid-commit.
        while not writers_done.is_set():
            assert_gapless(await whole_log(store))
            await anyio.sleep(0.005)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as readers:
            readers.start_soon(watch_prefix)
            async with anyio.create_task_group() as writers:
                for job_id in job_ids:
                    writers.start_soon(run_lifecycle, store, job_id)
            writers_done.set()
    log = await whole_log(store)
    assert len(log) == 600
    for job_id in job_ids:
        assert [s.version for s in await store.read_job(job_id)] == [1, 2, 3]
    assert await store.count_jobs() == {(WF, "completed"): 200}
    await assert_read_model_is_replay(store)


async def test_racing_appends_on_one_job_have_exactly_one_winner(store: EventStore) -> None:
    """Twenty workers claiming one job at the same version: one wins, the rest conflict."""
    await create(store, "A")
    winners: list[str] = []
    losers: list[ConcurrencyConflict] = []

    async def claim(worker: str) -> None:
        try:
            await store.append("A", [started("A", worker=worker)], 1)
        except ConcurrencyConflict as exc:
            losers.append(exc)
        else:
            winners.append(worker)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(claim, f"w{i}")
    assert len(winners) == 1 and len(losers) == 19
    assert all((exc.expected, exc.actual) == (1, 2) for exc in losers)
    events = await store.read_job("A")
    assert [s.version for s in events] == [1, 2]
    assert events[1].event == started("A", worker=winners[0])


async def test_racing_creates_for_one_file_have_exactly_one_winner(store: EventStore) -> None:
    """Twenty jobs created at once for one file: one is accepted, the rest name it as duplicate."""
    winners: list[str] = []
    losers: list[DuplicateJob] = []

    async def submit(job_id: str) -> None:
        try:
            await create(store, job_id)
        except DuplicateJob as exc:
            losers.append(exc)
        else:
            winners.append(job_id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(submit, f"J{i:02d}")
    assert len(winners) == 1 and len(losers) == 19
    assert {exc.existing_job_id for exc in losers} == set(winners)
    assert await store.last_seq() == 1


async def test_cancelled_appends_leave_a_consistent_store(store: EventStore) -> None:
    """Appends cancelled mid-flight leave the log whole and the read model equal to its replay."""
    scopes: list[anyio.CancelScope] = []

    async def lifecycle(job_id: str) -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await run_lifecycle(store, job_id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(lifecycle, f"job-{i:02d}")
            for step in (2, 3, 5):
                await anyio.lowlevel.checkpoint()
                for scope in scopes[::step]:
                    scope.cancel()
    await assert_read_model_is_replay(store)
    last = await store.last_seq()
    assert [s.seq for s in await create(store, "after", name="after.pdf")] == [last + 1]


# -- tail ----------------------------------------------------------------------------


async def test_tail_yields_existing_then_new_events(store: EventStore) -> None:
    """tail(after) yields the stored events after `after`, then waits for and yields new ones."""
    await create(store, "A")
    await create(store, "B", name="b.pdf")
    await create(store, "C", name="c.pdf")
    with anyio.fail_after(10):
        async with tailing(store, 1) as events, anyio.create_task_group() as tg:
            assert [(await anext(events)).job_id for _ in range(2)] == ["B", "C"]

            async def append_later() -> None:
                await anyio.sleep(0.05)  # the reader is already waiting
                await store.append("A", [started("A")], 1)

            tg.start_soon(append_later)
            newest = await anext(events)
    assert (newest.seq, newest.job_id, newest.version) == (4, "A", 2)
    assert newest == (await store.read_all(3, 1))[0]


async def test_tail_sees_concurrent_appends_in_seq_order(store: EventStore) -> None:
    """A tail from 0 yields every concurrently appended event exactly once, in seq order."""
    got: list[StoredEvent] = []

    async def follow() -> None:
        async with tailing(store, 0) as events:
            async for stored in events:
                got.append(stored)
                if len(got) == 150:
                    return

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            async with anyio.create_task_group() as writers:
                for i in range(50):
                    writers.start_soon(run_lifecycle, store, f"job-{i:02d}")
    assert got == await whole_log(store)


# -- read-model queries -------------------------------------------------------------------


async def test_get_job_is_the_fold_of_its_events(store: EventStore) -> None:
    """get_job returns the replayed status row, stamped with its seq and created_seq."""
    await create(store, "X", name="x.pdf")
    await create(store, "A")
    await store.append("A", [started("A"), progressed("A")], 1)
    job = await store.get_job("A")
    assert job == replay(await whole_log(store))["A"]
    assert job is not None and job.status is Status.RUNNING
    assert (job.version, job.seq, job.created_seq, job.progress) == (3, 4, 2, 0.5)


async def test_find_active_follows_the_owner_of_a_file(store: EventStore) -> None:
    """find_active names the pending or running job of a file, and nothing once it ended."""
    path = f"{WF}/input/a.pdf"
    await create(store, "A")
    assert (await store.find_active(WF, path)).status is Status.PENDING  # type: ignore[union-attr]
    await advance(store, "A", [started("A")])
    assert (await store.find_active(WF, path)).status is Status.RUNNING  # type: ignore[union-attr]
    await advance(store, "A", [completed("A")])
    assert await store.find_active(WF, path) is None
    assert await store.find_active("other", path) is None


async def test_find_by_key_finds_the_job_whatever_its_status(store: EventStore) -> None:
    """find_by_key returns the job created with the key, active or ended."""
    await create(store, "A", key="k1")
    assert (await store.find_by_key(WF, "k1")).id == "A"  # type: ignore[union-attr]
    await advance(store, "A", ENDINGS["failed_finally"]("A"))
    found = await store.find_by_key(WF, "k1")
    assert found is not None and found.status is Status.FAILED
    assert await store.find_by_key(WF, "k2") is None
    assert await store.find_by_key("other", "k1") is None


async def test_active_jobs_are_oldest_first_and_filtered(store: EventStore) -> None:
    """active_jobs lists pending and running jobs by creation order, optionally of one workflow."""
    jobs = [("E", "alpha"), ("B", "beta"), ("D", "alpha"), ("A", "beta"), ("C", "alpha")]
    for i, (job_id, wf) in enumerate(jobs):  # creation order is not id order
        await create(store, job_id, wf=wf, t=i, name=f"{i}.pdf")
    await advance(store, "B", [started("B", t=10)])
    await advance(store, "D", ENDINGS["cancelled"]("D"))
    await advance(store, "E", ENDINGS["failed_finally"]("E"))
    await advance(store, "E", [retried("E", t=11)])  # back in the queue, at its old place
    assert [job.id for job in await store.active_jobs()] == ["E", "B", "A", "C"]
    assert [job.id for job in await store.active_jobs("alpha")] == ["E", "C"]
    assert [job.id for job in await store.active_jobs("beta")] == ["B", "A"]
    assert await store.active_jobs("gamma") == []
    await assert_read_model_is_replay(store)


async def test_count_jobs_by_workflow_and_status(store: EventStore) -> None:
    """count_jobs counts jobs per (workflow, status) string."""
    for i in range(3):
        await create(store, f"A{i}", wf="alpha", name=f"{i}.pdf")
    await create(store, "B0", wf="beta")
    await advance(store, "A0", ENDINGS["completed"]("A0"))
    await advance(store, "A1", [started("A1")])
    await advance(store, "B0", ENDINGS["cancelled"]("B0"))
    assert await store.count_jobs() == {
        ("alpha", "completed"): 1,
        ("alpha", "running"): 1,
        ("alpha", "pending"): 1,
        ("beta", "cancelled"): 1,
    }


# -- list_jobs -------------------------------------------------------------------------------


async def populate(store: EventStore, count: int = 12) -> dict[str, Job]:
    """Jobs created one second apart across workflows, channels and statuses; the replayed log."""
    for i in range(count):
        job_id = f"J{i * 37 % 100:02d}"  # creation order is not id order
        wf = ("alpha", "beta")[i % 2]
        await create(store, job_id, t=i, wf=wf, name=f"{i}.pdf", channel=(None, "ch")[i % 3 == 0])
        ending = (None, "completed", "failed_finally", None, "cancelled")[i % 5]
        if ending is not None:
            await advance(store, job_id, ENDINGS[ending](job_id))
    return replay(await whole_log(store))


def newest_first(jobs: dict[str, Job], keep: Callable[[Job], bool]) -> list[str]:
    kept = [job for job in jobs.values() if keep(job)]
    return [job.id for job in sorted(kept, key=lambda job: job.created_seq, reverse=True)]


FILTERS: dict[str, tuple[JobQuery, Callable[[Job], bool]]] = {
    "all": (JobQuery(), lambda job: True),
    "workflow": (JobQuery(workflow_name="beta"), lambda job: job.workflow_name == "beta"),
    "status": (JobQuery(status=Status.PENDING), lambda job: job.status is Status.PENDING),
    "channel": (JobQuery(channel_name="ch"), lambda job: job.channel_name == "ch"),
    "created_after": (JobQuery(created_after=at(6.5)), lambda job: job.created_at > at(6.5)),
    "created_before": (JobQuery(created_before=at(4.5)), lambda job: job.created_at < at(4.5)),
    "created_between": (
        JobQuery(created_after=at(2.5), created_before=at(8.5)),
        lambda job: at(2.5) < job.created_at < at(8.5),
    ),
    "workflow_and_status": (
        JobQuery(workflow_name="alpha", status=Status.COMPLETED),
        lambda job: job.workflow_name == "alpha" and job.status is Status.COMPLETED,
    ),
    "no_match": (JobQuery(workflow_name="gamma"), lambda job: False),
}


@pytest.mark.parametrize("name", list(FILTERS))
async def test_list_jobs_filters_newest_first(store: EventStore, name: str) -> None:
    """list_jobs returns exactly the jobs its filters match, newest first."""
    jobs = await populate(store)
    query, keep = FILTERS[name]
    page = await store.list_jobs(query)
    assert [job.id for job in page.items] == newest_first(jobs, keep)
    assert page.next_cursor is None
    assert all(job == jobs[job.id] for job in page.items)


async def test_list_jobs_created_range_is_half_open(store: EventStore) -> None:
    """created_after is inclusive and created_before exclusive, like the memory store."""
    jobs = await populate(store)
    page = await store.list_jobs(JobQuery(created_after=at(3), created_before=at(7)))
    expected = newest_first(jobs, lambda job: at(3) <= job.created_at < at(7))
    assert [job.id for job in page.items] == expected


async def collect_pages(store: EventStore, query: JobQuery) -> list[list[str]]:
    pages: list[list[str]] = []
    while True:
        page = await store.list_jobs(query)
        pages.append([job.id for job in page.items])
        if page.next_cursor is None:
            return pages
        assert len(pages) <= 100, "the cursor does not advance"
        query = JobQuery(**{**_fields(query), "cursor": page.next_cursor})


def _fields(query: JobQuery) -> dict[str, object]:
    return {name: getattr(query, name) for name in query.__struct_fields__}


@pytest.mark.parametrize(
    ("count", "limit", "name"),
    [(25, 7, "all"), (21, 7, "all"), (5, 10, "all"), (1, 1, "all"), (0, 3, "all"),
     (25, 2, "workflow"), (25, 3, "status")],
)
async def test_list_jobs_pages_cover_every_job_exactly_once(
    store: EventStore, count: int, limit: int, name: str
) -> None:
    """Following next_cursor visits every matching job once, in order, in full pages."""
    jobs = await populate(store, count)
    query, keep = FILTERS[name]
    pages = await collect_pages(store, JobQuery(**{**_fields(query), "limit": limit}))
    assert [job_id for page in pages for job_id in page] == newest_first(jobs, keep)
    assert all(len(page) == limit for page in pages[:-1])
    assert 0 < len(pages[-1]) <= limit or len(pages) == 1


async def test_list_jobs_cursor_is_stable_while_jobs_are_created(store: EventStore) -> None:
    """Jobs created between pages neither repeat nor skip the jobs of the listing already begun."""
    jobs = await populate(store, 10)
    first = await store.list_jobs(JobQuery(limit=4))
    for i in range(3):
        await create(store, f"N{i}", t=100 + i, name=f"new-{i}.pdf")
    rest = await collect_pages(store, JobQuery(limit=4, cursor=first.next_cursor))
    seen = [job.id for job in first.items] + [job_id for page in rest for job_id in page]
    assert seen == newest_first(jobs, lambda job: True)


@pytest.mark.parametrize("cursor", ["garbage", "not a cursor", "%%%", "eyJ4IjoxfQ"])
async def test_list_jobs_rejects_an_invalid_cursor(store: EventStore, cursor: str) -> None:
    """A cursor the store did not make raises ValueError."""
    await populate(store, 3)
    with pytest.raises(ValueError):
        await store.list_jobs(JobQuery(cursor=cursor))


# -- the oracles: replay and chain ---------------------------------------------------------


WORKFLOWS = ("alpha", "beta")
KEYS = (None, "k1", "k2")
# What an operation may do to a job, by its status (decide() still has the last word).
MOVES: dict[Status, tuple[str, ...]] = {
    Status.PENDING: ("start", "start", "refuse", "cancel"),
    Status.RUNNING: ("progress", "complete", "fail_retry", "fail_final", "cancel"),
    Status.FAILED: ("retry",),
    Status.CANCELLED: ("retry",),
    Status.COMPLETED: (),
}
Operation = tuple[bool, int, int, bool]  # (create?, which job or file, which move, stale?)


def command_for(op: Operation, jobs: dict[str, Job], step: int) -> AnyCommand:
    """The command an operation stands for, against the jobs of the replayed log."""
    create, pick, move, _ = op
    job = list(jobs.values())[pick % len(jobs)] if jobs else None
    if create or job is None or not MOVES[job.status]:
        return create_command(pick, step)
    return move_command(job, MOVES[job.status][move % len(MOVES[job.status])], pick, at(step))


def create_command(pick: int, step: int) -> CreateJob:
    wf = WORKFLOWS[pick % 2]
    return CreateJob(
        job_id=f"job-{step * 37 % 100:02d}", at=at(step), workflow_name=wf,  # not in id order
        file_path=f"{wf}/input/{('x', 'y')[pick // 2 % 2]}.csv",
        channel_name=(None, "ch")[pick % 3 == 0], priority=pick % 5,
        idempotency_key=KEYS[pick // 4 % 3],
    )


def move_command(job: Job, move: str, pick: int, now: datetime) -> AnyCommand:
    attempt = job.attempts
    match move:
        case "start":
            return StartJob(job_id=job.id, at=now, worker=f"w{pick}")
        case "progress":
            return ReportProgress(job_id=job.id, at=now, attempt=attempt, fraction=pick / 15)
        case "complete":
            return CompleteJob(job_id=job.id, at=now, attempt=attempt, result={"pick": pick})
        case "fail_retry" | "fail_final":
            retry_at = now if move == "fail_retry" else None
            return FailJob(job_id=job.id, at=now, attempt=attempt, error_type="Boom",
                           message=move, retry_at=retry_at)
        case "refuse":
            return RefuseAtIntake(job_id=job.id, at=now, error_type="TooLarge", message="big")
        case "cancel":
            return CancelJob(job_id=job.id, at=now, actor="cli")
    return RetryJob(job_id=job.id, at=now, actor="cli")


def duplicates_of(jobs: dict[str, Job], event: Event) -> set[str]:
    """The job ids a correct store may name in DuplicateJob for this event (empty: accepted)."""
    active = [job for job in jobs.values() if job.is_active]
    if isinstance(event, JobCreated):
        file_key = (event.workflow_name, event.file_path)
        owners = {job.id for job in active if (job.workflow_name, job.file_path) == file_key}
        key = (event.workflow_name, event.idempotency_key)
        keyed = {
            job.id for job in jobs.values()
            if key[1] is not None and (job.workflow_name, job.idempotency_key) == key
        }
        return owners | keyed
    if isinstance(event, JobRetried):
        me = jobs[event.job_id]
        file_key = (me.workflow_name, me.file_path)
        return {
            job.id for job in active
            if (job.workflow_name, job.file_path) == file_key and job.id != me.id
        }
    return set()


async def run_operation(store: EventStore, op: Operation, step: int) -> None:
    """Decide a command against the replayed log, append it (perhaps stale), check the outcome."""
    stale = op[3]
    before = await whole_log(store)
    jobs = replay(before)
    command = command_for(op, jobs, step)
    job = jobs.get(command.job_id)
    try:
        events = decide(job, command)
    except Rejected:
        return
    version = job.version if job is not None else 0
    expected = version - 1 if stale and version > 0 else version + int(stale)
    duplicates = duplicates_of(jobs, events[0])
    try:
        stored = await store.append(command.job_id, events, expected)
    except ConcurrencyConflict:
        assert stale
    except DuplicateJob as exc:
        assert exc.existing_job_id in duplicates
    else:
        assert not stale and not duplicates
        assert_gapless(stored, first=len(before) + 1)
        return
    await assert_nothing_written(store, before)


OPERATIONS = st.lists(
    st.tuples(
        st.integers(0, 3).map(lambda n: n == 0),
        st.integers(0, 15),
        st.integers(0, 4),
        st.integers(0, 9).map(lambda n: n == 0),
    ),
    min_size=20,
    max_size=60,
)


@settings(
    max_examples=25,
    deadline=None,
    database=None,  # no .hypothesis/ folder: pytest's norecursedirs would warn about it
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPERATIONS)
async def test_read_model_equals_replay_of_the_log(
    fresh_store: FreshStore, ops: list[Operation]
) -> None:
    """After any mix of appends, conflicts and duplicates, every query agrees with replay."""
    async with fresh_store() as store:
        for step, op in enumerate(ops):
            await run_operation(store, op, step)
        await assert_read_model_is_replay(store)


async def test_every_stored_hash_verifies(store: EventStore) -> None:
    """The stored hashes form the kernel.chain chain from GENESIS over the stored payloads."""
    await populate(store, 8)
    returned = await store.append("Z", [created("Z", name="z.pdf"), started("Z")], 0)
    log = await whole_log(store)
    assert_chain(log)
    assert [s.hash for s in log[-2:]] == [s.hash for s in returned]


async def test_any_text_in_an_event_is_stored_byte_for_byte(store: EventStore) -> None:
    """Quotes, backslashes, control characters, escapes written out, characters outside
    the BMP and combining marks in an event's fields come back as they went in, in the log
    and in the job's row, and the chain verifies over them."""
    text = 'q"uote \\back\\slash \\u0000 \x01\x1f\t\n\r 😀 e\u0301 \u2028 日本 {"x": [1]}'
    await store.append("T", [created("T", name="t.pdf"), started("T")], 0)
    stored = await store.append("T", [JobFailed(
        job_id="T", at=at(3), error_type="ValueError", message=text, traceback=text,
        attempt=1, retry_at=None)], 2)
    (event,) = [s.event for s in await store.read_job("T") if isinstance(s.event, JobFailed)]
    assert event.message == text and event.traceback == text
    assert stored[0].event == event
    job = await store.get_job("T")
    assert job is not None and job.error is not None and job.error.message == text
    assert_chain(await whole_log(store))


async def test_append_after_close_is_unavailable(store: EventStore, opened: OpenStore) -> None:
    """A closed store refuses appends with StoreUnavailable."""
    await create(store, "A")
    await opened.close()
    with pytest.raises(StoreUnavailable):
        await create(store, "B", name="b.pdf")


async def test_reads_after_close_leak_no_driver_error(store: EventStore, opened: OpenStore) -> None:
    """A closed store's reads answer or raise StoreUnavailable, never their driver's error."""
    await create(store, "A")
    await opened.close()
    reads = {
        "read_all": lambda: store.read_all(0, 10),
        "read_job": lambda: store.read_job("A"),
        "last_seq": store.last_seq,
        "get_job": lambda: store.get_job("A"),
        "find_active": lambda: store.find_active(WF, f"{WF}/input/a.pdf"),
        "find_by_key": lambda: store.find_by_key(WF, "k"),
        "active_jobs": store.active_jobs,
        "list_jobs": lambda: store.list_jobs(JobQuery()),
        "count_jobs": store.count_jobs,
    }
    leaked = {}
    for name, read in reads.items():
        try:
            await read()
        except StoreUnavailable:
            pass
        except Exception as exc:
            leaked[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert leaked == {}


# -- durability (stores that persist) ----------------------------------------------------------


async def test_log_and_read_model_survive_reopen(store: EventStore, reopen: Reopen) -> None:
    """Every event and every read-model row is there again after close and reopen."""
    await populate(store, 10)
    await create(store, "K", name="k.pdf", key="k1")
    log = await whole_log(store)
    jobs = replay(log)
    store = await reopen()
    assert await whole_log(store) == log
    assert await store.last_seq() == log[-1].seq
    for job_id, job in jobs.items():
        assert await store.get_job(job_id) == job
    await assert_read_model_is_replay(store)


async def test_appends_continue_the_chain_after_reopen(store: EventStore, reopen: Reopen) -> None:
    """After reopen, seq, versions and the hash chain carry on from where they stopped."""
    await populate(store, 6)
    last = await store.last_seq()
    store = await reopen()
    pending = (await store.active_jobs())[0]
    more = await store.append(pending.id, [started(pending.id, t=50)], pending.version)
    more += await create(store, "N", t=51, name="n.pdf")
    assert [(s.seq, s.version) for s in more] == [(last + 1, pending.version + 1), (last + 2, 1)]
    store = await reopen()
    await assert_read_model_is_replay(store)


async def test_append_rules_survive_reopen(store: EventStore, reopen: Reopen) -> None:
    """After reopen, versions, active files and used idempotency keys are still enforced."""
    await create(store, "A", name="a.pdf")
    await create(store, "K", name="k.pdf", key="k1")
    await advance(store, "K", ENDINGS["completed"]("K"))
    store = await reopen()
    before = await whole_log(store)
    with pytest.raises(ConcurrencyConflict):
        await store.append("A", [started("A")], 0)
    with pytest.raises(DuplicateJob) as busy:
        await create(store, "B", name="a.pdf")
    with pytest.raises(DuplicateJob) as used:
        await create(store, "C", name="c.pdf", key="k1")
    assert (busy.value.existing_job_id, used.value.existing_job_id) == ("A", "K")
    await assert_nothing_written(store, before)
    await create(store, "D", name="k.pdf")  # K ended, so its file is free



async def test_close_flushes_appends_in_flight(store: EventStore, reopen: Reopen) -> None:
    """Appends queued when the store closes are written, or refused whole; none is half-done."""
    closing = store
    accepted: dict[str, bool] = {}

    async def submit(job_id: str) -> None:
        try:
            await create(closing, job_id, name=f"{job_id}.pdf")
        except StoreUnavailable:
            accepted[job_id] = False
        else:
            accepted[job_id] = True

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(submit, f"J{i:02d}")
            await anyio.lowlevel.checkpoint()  # the appends are queued now
            store = await reopen()
    stored = {s.job_id for s in await whole_log(store)}
    assert stored == {job_id for job_id, ok in accepted.items() if ok}
    assert stored, "the appends in flight at close were dropped, not flushed"
    await assert_read_model_is_replay(store)
