"""The log's newest events, pushed to every node with the commit's NOTIFY (decision 0008).

An appending transaction sends its rows on the schema's channel (`messages`): a node
following the log then decodes them once from its LISTEN connection into its `Feed`,
and its tailers (the follower, the observer, webhooks, the live log) take them from
there instead of each querying the table after every commit of every node.

Notifications come in commit order (PostgreSQL queues them at commit, and the append
lock orders the commits), so the feed is contiguous by seq; what it cannot hold (a
group too large for a notification, a gap after a lost connection) it reads from the
table. A tailer further behind than the feed's window reads the table too.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from adapters.memory import Notifier
from kernel.events import decode_event
from kernel.state import StoredEvent

# PostgreSQL refuses a payload of 8000 bytes or more; keep room for the envelope.
PAYLOAD_MAX = 7800
# A group whose rows need more than this goes out as a marker: listeners read the table.
GROUP_MAX = 256 * 1024
FEED_WINDOW = 8192  # events kept for tailers (a slower one reads the table)

Row = tuple[int, str, int, str, str]  # seq, job_id, version, hash, payload


class Message(msgspec.Struct, array_like=True, frozen=True):
    """One notification: rows `first..last` appended by `node`; `rows` None when the
    listener must read them from the table."""

    node: str
    first: int
    last: int
    rows: list[Row] | None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def messages(node: str, rows: Sequence[Row]) -> list[str]:
    """The notifications that carry `rows` (one seq-ordered group), each small enough."""
    if not rows:
        return []
    head = _encoder.encode(node)
    room = PAYLOAD_MAX - len(head) - 48  # the envelope: node, first, last, brackets
    encoded = [_encoder.encode(row) for row in rows]
    if sum(len(e) + 1 for e in encoded) > GROUP_MAX or max(len(e) for e in encoded) > room:
        return [_envelope(head, rows[0][0], rows[-1][0], None)]
    out: list[str] = []
    start, size = 0, 0
    for index, row in enumerate(encoded):
        if index > start and size + len(row) + 1 > room:
            out.append(_envelope(head, rows[start][0], rows[index - 1][0], encoded[start:index]))
            start, size = index, 0
        size += len(row) + 1
    out.append(_envelope(head, rows[start][0], rows[-1][0], encoded[start:]))
    return out


def _envelope(node: bytes, first: int, last: int, rows: list[bytes] | None) -> str:
    """A Message as JSON, from rows encoded once."""
    body = b"null" if rows is None else b"[" + b",".join(rows) + b"]"
    return (b"[" + node + b",%d,%d," % (first, last) + body + b"]").decode()


def parse(payload: str) -> Message | None:
    """A notification's message; None for one this version cannot read (read the table)."""
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError:
        return None


class Feed:
    """The newest events of the log, contiguous by seq, with the node that appended each.

    Live only while the LISTEN connection is: then every event up to `head` is here or
    older than the window (`base`), and `head` moves as notifications arrive.
    """

    def __init__(self, window: int = FEED_WINDOW) -> None:
        self.window = window
        self.live = False
        self.base = 0  # events with seq > base and <= head are held
        self.head = 0
        self._events: list[tuple[StoredEvent, str]] = []
        self._arrived = Notifier()

    def start(self, head: int) -> None:
        """The listener is connected and the log ends at `head`: hold what comes next."""
        self.base = self.head = head
        self._events = []
        self.live = True
        self._wake()

    def stop(self) -> None:
        """The listener lost its connection: tailers read the table until it is back."""
        self.live = False
        self._events = []
        self._wake()

    def add(self, stored: StoredEvent, node: str) -> bool:
        """Append the next event; False (nothing kept) if it is not `head + 1`."""
        if stored.seq != self.head + 1:
            return stored.seq <= self.head  # already held: fine; beyond: a gap
        self._events.append((stored, node))
        self.head = stored.seq
        if len(self._events) > 2 * self.window:
            del self._events[: self.window]
            self.base += self.window
        return True

    def published(self) -> None:
        """Wake the tailers: events were added."""
        self._wake()

    def after(self, seq: int) -> list[tuple[StoredEvent, str]] | None:
        """The held events after `seq`; None if this feed cannot tell (read the table)."""
        if not self.live or seq < self.base:
            return None
        if seq >= self.head:
            return []
        return self._events[seq - self.base:]

    async def wait(self, timeout_s: float) -> None:
        """Until events are added or the feed starts or stops, or `timeout_s` passes."""
        await self._arrived.wait(timeout_s)

    def _wake(self) -> None:
        self._arrived.notify()


def stored_of(row: Row) -> StoredEvent:
    """The StoredEvent of one notified row."""
    seq, job_id, version, chain_hash, payload = row
    return StoredEvent(seq=seq, job_id=job_id, version=version, event=decode_event(payload),
                       hash=chain_hash)
