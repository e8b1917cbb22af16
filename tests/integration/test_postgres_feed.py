"""The rows of each commit reach the other nodes in its NOTIFY (adapters/postgres/feed.py).

A node's tailers take every node's events from its feed, in seq order, with the hash
chain's values; a group too large for a notification, or a gap, is read from the table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest

from adapters.postgres import PostgresEventStore
from adapters.postgres.feed import GROUP_MAX, PAYLOAD_MAX, Feed, messages, parse, stored_of
from kernel.events import JobCreated, JobStarted
from kernel.ports import Append
from kernel.state import StoredEvent
from tests.integration.pgkit import fresh_schema, store_url

pytestmark = pytest.mark.anyio


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async for name in fresh_schema("mf_feed"):
        yield name


def created(i: int, note: str = "") -> Append:
    job_id = f"01FEED{i:020d}"
    return Append(job_id, [JobCreated(job_id=job_id, at=datetime.now(UTC), workflow_name="wf",
                                      file_path=f"wf/input/{i}{note}.txt")], 0)


async def feed_reaches(store: PostgresEventStore, seq: int) -> None:
    with anyio.fail_after(10):
        while not (store._feed.live and store._feed.head >= seq):
            await store._feed.wait(0.05)


def test_messages_carry_every_row_in_small_notifications_or_a_marker() -> None:
    rows = [(seq, f"job{seq}", 1, "ab" * 32, '{"type":"job.created","x":"é\\n"}')
            for seq in range(1, 400)]
    notes = messages("host:1:abc", rows)
    assert len(notes) > 1
    assert all(len(note.encode()) < PAYLOAD_MAX + 100 for note in notes)
    parsed = [parse(note) for note in notes]
    assert [tuple(row) for m in parsed if m and m.rows for row in m.rows] == rows
    assert all(m is not None and m.node == "host:1:abc" for m in parsed)
    # Too large for one notification, or for the whole group: a marker of the range.
    for too_big in ([(1, "j", 1, "h", "x" * 9000)],
                    [(seq, "j", 1, "h", "x" * 4000) for seq in range(1, GROUP_MAX // 4000 + 2)]):
        (marker,) = messages("n", too_big)
        message = parse(marker)
        assert message is not None and message.rows is None
        assert (message.first, message.last) == (too_big[0][0], too_big[-1][0])
    assert parse("an older node's plain payload") is None


def test_the_feed_holds_contiguous_events_within_its_window() -> None:
    feed = Feed(window=4)
    assert feed.after(0) is None  # not live: read the table
    feed.start(10)
    payload = JobStarted(job_id="j", at=datetime.now(UTC), attempt=1, worker="n")
    event = stored_of((11, "j", 2, "h", __import__("msgspec").json.encode(payload).decode()))
    assert feed.add(event, "n") and feed.after(10) == [(event, "n")] and feed.after(11) == []
    assert not feed.add(StoredEvent(seq=13, job_id="j", version=3, event=payload, hash="h"), "n")
    for seq in range(12, 30):
        assert feed.add(StoredEvent(seq=seq, job_id="j", version=seq, event=payload, hash="h"),
                        "n")
    assert feed.after(10) is None  # older than the window
    held = feed.after(feed.base)
    assert held is not None and [s.seq for s, _ in held] == list(range(feed.base + 1, 30))
    feed.stop()
    assert feed.after(29) is None


async def test_another_node_gets_each_commit_from_the_notification(schema: str) -> None:
    writer = await PostgresEventStore.open(store_url(schema), node_id="writer")
    reader = await PostgresEventStore.open(store_url(schema), node_id="reader")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(reader.listen)
            await feed_reaches(reader, 0)
            await writer.append_batch([created(1)])  # one row
            await writer.append_batch([created(i, "x" * 3000) for i in range(2, 8)])  # chunks
            await writer.append_batch([created(i, "y" * 3000) for i in range(8, 120)])  # marker
            await reader.append_batch([created(200)])  # the reader's own
            expected = await reader.read_all(0, 1000)
            await feed_reaches(reader, expected[-1].seq)
            held = reader._feed.after(0)
            assert held is not None
            assert [(s.seq, s.job_id, s.version, s.hash) for s, _ in held] == \
                [(s.seq, s.job_id, s.version, s.hash) for s in expected]
            assert [s.event for s, _ in held] == [s.event for s in expected]
            assert {node for _, node in held} == {"writer", "reader"}

            others = []
            with anyio.fail_after(10):
                async for stored in reader.tail_others(0):
                    others.append(stored.seq)
                    if stored.seq == expected[-2].seq:
                        break
            assert others == [s.seq for s in expected[:-1]]
            # A gap (a notification lost with a connection) is read from the table.
            await writer.append_batch([created(300)])
            (last,) = await writer.read_chain(expected[-1].seq, 10)
            await feed_reaches(reader, last.seq)
            reader._feed.start(expected[0].seq)
            (note,) = messages("writer", [(last.seq, last.job_id, last.version, last.hash,
                                           last.payload.decode())])
            await reader._take(note)
            held = reader._feed.after(expected[0].seq)
            assert held is not None and [s.seq for s, _ in held] == \
                [s.seq for s in expected[1:]] + [last.seq]
            tg.cancel_scope.cancel()
    finally:
        await writer.close()
        await reader.close()
