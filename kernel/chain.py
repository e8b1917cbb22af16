"""The log's tamper-evident hash chain: `hash = sha256(prev_hash + canonical bytes)`.

The canonical bytes are a JSON array header `[seq,"job_id",version,"type"]`
(compact, as msgspec encodes it), a newline (0x0A), then the stored JSON payload
exactly as stored. The JSON header keeps the fields unambiguous whatever
characters they hold. Every store computes the same chain,
so a copy of the log into another store verifies with the same hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

GENESIS = "0" * 64
_header = msgspec.json.Encoder()


def canonical_bytes(seq: int, job_id: str, version: int, type_tag: str, payload: bytes) -> bytes:
    """The bytes a stored event is hashed over (documented order, see module docstring)."""
    return _header.encode((seq, job_id, version, type_tag)) + b"\n" + payload


def link(prev_hash: str, seq: int, job_id: str, version: int, type_tag: str, payload: bytes) -> str:
    """The hash of one stored event, chained to the one before it."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(canonical_bytes(seq, job_id, version, type_tag, payload))
    return digest.hexdigest()


class ChainRow:
    """One stored event's columns as the chain needs them."""

    __slots__ = ("hash", "job_id", "payload", "seq", "type_tag", "version")

    def __init__(
        self, seq: int, job_id: str, version: int, type_tag: str, payload: bytes, hash: str
    ) -> None:
        self.seq = seq
        self.job_id = job_id
        self.version = version
        self.type_tag = type_tag
        self.payload = payload
        self.hash = hash


class ChainReport:
    """What a walk of the chain found: how many events, and the first bad seq if any."""

    __slots__ = ("checked", "first_bad_seq", "last_hash", "reason")

    def __init__(self) -> None:
        self.checked = 0
        self.first_bad_seq: int | None = None
        self.reason = ""
        self.last_hash = GENESIS

    @property
    def ok(self) -> bool:
        """True when every event links to the one before it."""
        return self.first_bad_seq is None


def verify(rows: Iterable[ChainRow], prev_hash: str = GENESIS) -> ChainReport:
    """Walk rows in seq order; name the first seq whose hash or order does not hold."""
    report = ChainReport()
    report.last_hash = prev_hash
    last_seq = 0
    for row in rows:
        if row.seq <= last_seq:
            report.first_bad_seq, report.reason = row.seq, "seq out of order"
            return report
        expected = link(
            report.last_hash, row.seq, row.job_id, row.version, row.type_tag, row.payload
        )
        if expected != row.hash:
            report.first_bad_seq, report.reason = row.seq, "hash does not match its content"
            return report
        report.last_hash, last_seq = row.hash, row.seq
        report.checked += 1
    return report
