"""The SQLite store's write path: the writer thread's groups, and a group in one statement."""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from adapters.groupcommit import GROUP_EARLY_START, GroupCommitter, PendingAppend
from adapters.ledger import Batch, Ledger
from adapters.sqlite import SqliteEventStore, schema
from adapters.sqlite.store import newest
from adapters.sqlite.writer import GroupStatements, connect_writer, prepare_writer, write_batch
from adapters.sqlrows import JOB_COLUMNS, job_row
from kernel.chain import GENESIS
from kernel.events import Event, JobCompleted, JobCreated, JobStarted
from kernel.ports import Append, StoreError, StoreUnavailable
from kernel.state import StoredEvent, replay

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WAIT_S = 10.0

pytestmark = pytest.mark.anyio


def created(job_id: str, name: str | None = None) -> JobCreated:
    return JobCreated(job_id=job_id, at=T0, workflow_name="wf",
                      file_path=f"wf/input/{name or job_id}.txt")


def append_of(job_id: str) -> Append:
    return Append(job_id, [created(job_id)], 0)


class Recorder:
    """A fake `write` for GroupCommitter: records each group; can hold the writer thread."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def write(self, requests: list[PendingAppend]) -> None:
        self.threads.add(threading.current_thread().name)
        self.groups.append([r.job_id for r in requests])
        self.entered.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("the test never released the writer")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("disk on fire")
        for request in requests:
            request.result = [StoredEvent(seq=0, job_id=request.job_id, version=1,
                                          event=request.events[0])]


def wait_on_thread(event: threading.Event) -> bool:
    """Block the event loop itself until `event` is set (or time runs out)."""
    return event.wait(WAIT_S)


async def wait_async(event: threading.Event) -> None:
    """Wait for `event` while letting the loop run."""
    assert await anyio.to_thread.run_sync(event.wait, WAIT_S)


async def test_appends_issued_in_one_turn_share_one_group() -> None:
    """An idle writer waits for the end of the loop's turn, so appends issued together join."""
    recorder = Recorder()
    committer = GroupCommitter(recorder.write, lambda requests: None)
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(committer.submit, [append_of(f"J{i}")])
    await committer.stop(lambda: None)
    assert recorder.groups == [["J0", "J1", "J2", "J3", "J4"]]
    assert recorder.threads == {"multiflow-writer"}


async def test_the_writer_takes_the_next_group_without_the_loop() -> None:
    """Appends queued while a group commits are written next, even while the loop is blocked."""
    recorder = Recorder()
    committer = GroupCommitter(recorder.write, lambda requests: None)
    recorder.release.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(committer.submit, [append_of("first")])
        await wait_async(recorder.entered)  # the first group is taken; its write is held
        recorder.entered.clear()
        for i in range(3):
            tg.start_soon(committer.submit, [append_of(f"next{i}")])
        await anyio.lowlevel.checkpoint()  # the three are queued in the open group now
        recorder.release.set()
        # The loop is blocked here: only the writer thread can start the second group.
        assert wait_on_thread(recorder.entered), "the writer waited for the loop"
    await committer.stop(lambda: None)
    assert recorder.groups == [["first"], ["next0", "next1", "next2"]]


async def test_an_idle_writer_starts_early_once_enough_appends_joined() -> None:
    """A group reaching GROUP_EARLY_START appends starts before the loop's turn ends."""
    recorder = Recorder()
    committer = GroupCommitter(recorder.write, lambda requests: None)
    async with anyio.create_task_group() as tg:
        for i in range(GROUP_EARLY_START):
            tg.start_soon(committer.submit, [append_of(f"J{i}")])
        await anyio.lowlevel.checkpoint()  # every task has joined the open group, in this one turn
        assert wait_on_thread(recorder.entered), "the writer waited for the end of the turn"
    await committer.stop(lambda: None)
    assert len(recorder.groups[0]) == GROUP_EARLY_START


async def test_a_failing_write_fails_its_group_and_the_writer_goes_on() -> None:
    """A write that raises fails that group's appends as unavailable; the next group works."""
    recorder = Recorder()
    committer = GroupCommitter(recorder.write, lambda requests: None)
    recorder.fail_next = True
    (failed,) = await committer.submit([append_of("A")])
    (stored,) = await committer.submit([append_of("B")])
    await committer.stop(lambda: None)
    assert isinstance(failed, StoreUnavailable) and "disk on fire" in str(failed)
    assert isinstance(stored, list) and stored[0].job_id == "B"


async def test_calls_run_in_order_with_groups_and_raise_to_their_caller() -> None:
    """`call` runs on the writer thread after the work queued before it; errors come back."""
    recorder = Recorder()
    committer = GroupCommitter(recorder.write, lambda requests: None)
    seen: list[str] = []

    def boom() -> None:
        raise ValueError("bad call")

    async with anyio.create_task_group() as tg:
        tg.start_soon(committer.submit, [append_of("A")])
        await anyio.lowlevel.checkpoint()
        assert await committer.call(lambda: seen.append(str(len(recorder.groups))) or 7) == 7
    with pytest.raises(ValueError, match="bad call"):
        await committer.call(boom)
    await committer.stop(lambda: seen.append("closed"))
    assert seen == ["1", "closed"]
    with pytest.raises(StoreUnavailable):
        await committer.submit([append_of("late")])


# -- one group, one statement -----------------------------------------------------------


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect_writer(tmp_path / "log.db")
    schema.migrate(conn)
    prepare_writer(conn)
    yield conn
    conn.close()


def prepared(ledger: Ledger, appends: list[tuple[str, list[Event], int]]) -> Batch:
    batch = ledger.begin(lambda job_id: None, lambda workflow, key: None)
    for job_id, events, version in appends:
        batch.prepare(job_id, events, version)
    return batch


def lifecycle(i: int) -> tuple[str, list[Event], int]:
    job_id = f"J{i}"
    at = T0 + timedelta(seconds=i)
    events: list[Event] = [created(job_id)]
    if i % 2:
        events.append(JobStarted(job_id=job_id, at=at, attempt=1))
    if i % 3 == 0:
        events += [JobStarted(job_id=job_id, at=at, attempt=1),
                   JobCompleted(job_id=job_id, at=at, attempt=1, output_paths=["wf/o.txt"])]
    return job_id, events, 0


def test_a_group_is_one_insert_and_its_rows_are_the_read_model(
        writer: sqlite3.Connection) -> None:
    """A batch is one statement (no BEGIN/COMMIT of ours); every job row equals job_row(job)."""
    statements: list[str] = []
    writer.set_trace_callback(statements.append)
    batch = prepared(Ledger(0, GENESIS), [lifecycle(i) for i in range(7)])
    write_batch(writer, GroupStatements(writer), batch)
    writer.set_trace_callback(None)
    # (the trace repeats the statement for each step of its trigger)
    (only,) = set(statements)
    assert only.startswith("INSERT INTO appended VALUES")
    assert not writer.in_transaction  # committed by the statement itself
    rows = writer.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id").fetchall()
    assert rows == sorted(job_row(job) for job in batch.jobs.values())
    events = writer.execute("SELECT seq, job_id, version, type, payload, hash FROM events "
                            "ORDER BY seq").fetchall()
    assert [(r[0], r[1], r[2], r[5]) for r in events] == [
        (row.stored.seq, row.stored.job_id, row.stored.version, row.stored.hash)
        for row in batch.rows]
    assert [r[4].encode() for r in events] == [row.payload for row in batch.rows]
    stored = [row.stored for row in batch.rows]
    assert replay(stored) == batch.jobs


def test_a_group_over_one_statement_is_still_one_transaction(writer: sqlite3.Connection) -> None:
    """Split over several statements, a batch the file refuses at its end leaves nothing."""
    small = GroupStatements(writer, rows_max=3)
    first = prepared(Ledger(0, GENESIS), [lifecycle(i) for i in range(4)])
    write_batch(writer, small, first)
    ledger = Ledger(first.last_seq, first.last_hash)
    second = prepared(ledger, [lifecycle(i) for i in range(10, 20)])
    assert len(second.rows) > 3 * small.rows_max
    # Another writer took the seq of the batch's last event: only its last statement fails.
    writer.execute("INSERT INTO events (seq, job_id, version, type, at, payload, hash) "
                   "VALUES (?, 'X', 1, 'job.created', '', '{}', '')", (second.last_seq,))
    before = writer.execute("SELECT count(*) FROM events").fetchone()[0]
    with pytest.raises(sqlite3.IntegrityError):
        write_batch(writer, small, second)
    assert not writer.in_transaction
    assert writer.execute("SELECT count(*) FROM events").fetchone()[0] == before
    assert writer.execute("SELECT count(*) FROM jobs").fetchone()[0] == len(first.jobs)


# -- through the store ------------------------------------------------------------------


async def test_a_group_the_file_refuses_fails_whole_and_the_store_recovers(
        tmp_path: Path) -> None:
    """If the file refuses a group, none of its appends is stored, and later appends work."""
    path = tmp_path / "log.db"
    store = await SqliteEventStore.open(path)
    try:
        await store.append("A", [created("A")], 0)
        intruder = sqlite3.connect(path, isolation_level=None)
        intruder.execute("INSERT INTO events (seq, job_id, version, type, at, payload, hash) "
                         "VALUES (3, 'X', 1, 'job.created', '', '{}', '')")
        intruder.close()
        results = await store.append_batch([append_of("B"), append_of("C")])
        assert all(isinstance(r, StoreError) for r in results)
        assert [row.job_id for row in await store.read_chain(0, 100)] == ["A", "X"]
        assert await store.get_job("B") is None and await store.get_job("C") is None
        stored = await store.append("D", [created("D")], 0)
        assert stored[0].seq == 4  # the ledger re-read the file's head
    finally:
        await store.close()


async def test_side_writes_and_appends_share_the_writer_thread(tmp_path: Path) -> None:
    """Checkpoints and appends interleave on one connection without a transaction clash."""
    store = await SqliteEventStore.open(tmp_path / "log.db")
    try:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(store.append, f"J{i}", [created(f"J{i}")], 0)
                tg.start_soon(store.set_checkpoint, f"consumer{i % 5}", i)
        assert await store.last_seq() == 50
        assert {await store.get_checkpoint(f"consumer{n}") for n in range(5)} <= set(range(50))
    finally:
        await store.close()


def test_newest_is_the_slice_of_the_recent_window_from_either_end() -> None:
    """Reading the recent window from its right end gives exactly the slice, for any start."""
    recent: deque[int] = deque(range(100, 140), maxlen=40)
    for start in range(45):
        for limit in (1, 2, 7, 39, 1000):
            assert newest(recent, start, limit) == list(recent)[start:start + limit]


async def test_rebuild_runs_right_after_open_and_is_refused_while_an_append_is_in_flight(
        tmp_path: Path) -> None:
    """The writer is idle once open returns; an append not yet handed back makes it busy."""
    path = tmp_path / "log.db"
    store = await SqliteEventStore.open(path)
    await store.append("A", [created("A")], 0)
    await store.close()
    store = await SqliteEventStore.open(path)
    try:
        assert (await store.rebuild()).events == 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.append, "B", [created("B")], 0)
            await anyio.lowlevel.checkpoint()  # B has joined a group, not yet handed back
            with pytest.raises(StoreUnavailable, match="in flight"):
                await store.rebuild()
        assert (await store.rebuild()).events == 2
    finally:
        await store.close()
