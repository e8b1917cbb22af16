"""The tamper-evident hash chain: canonical bytes and verification."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from kernel.chain import GENESIS, ChainRow, canonical_bytes, link, verify
from kernel.events import (
    AnyEvent,
    JobCompleted,
    JobCreated,
    JobProgress,
    JobStarted,
    encode_event,
    event_tag,
)

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def _events() -> list[tuple[str, int, AnyEvent]]:
    """(job_id, version, event) for a small two-job log."""
    at = [T0 + timedelta(seconds=s) for s in range(6)]
    return [
        ("a", 1, JobCreated(job_id="a", at=at[0], workflow_name="wf", file_path="wf/input/a")),
        ("b", 1, JobCreated(job_id="b", at=at[1], workflow_name="wf", file_path="wf/input/b")),
        ("a", 2, JobStarted(job_id="a", at=at[2], attempt=1)),
        ("a", 3, JobProgress(job_id="a", at=at[3], fraction=0.5)),
        ("a", 4, JobCompleted(job_id="a", at=at[4], attempt=1)),
        ("b", 2, JobStarted(job_id="b", at=at[5], attempt=1)),
    ]


def good_chain(start_seq: int = 1, prev_hash: str = GENESIS) -> list[ChainRow]:
    """A correctly linked chain of six stored events, seqs from `start_seq`."""
    rows: list[ChainRow] = []
    for seq, (job_id, version, event) in enumerate(_events(), start=start_seq):
        payload, tag = encode_event(event), event_tag(event)
        prev_hash = link(prev_hash, seq, job_id, version, tag, payload)
        rows.append(ChainRow(seq, job_id, version, tag, payload, prev_hash))
    return rows


def relinked(rows: list[ChainRow]) -> list[ChainRow]:
    """The same rows with every hash recomputed in list order (a forger's rewrite)."""
    prev, out = GENESIS, []
    for r in rows:
        prev = link(prev, r.seq, r.job_id, r.version, r.type_tag, r.payload)
        out.append(ChainRow(r.seq, r.job_id, r.version, r.type_tag, r.payload, prev))
    return out


def test_canonical_bytes_are_seq_job_version_type_then_payload() -> None:
    """The hashed bytes are the JSON header [seq,"job_id",version,"type"], newline, payload."""
    payload = b'{"type":"job.started","job_id":"j1"}'
    assert canonical_bytes(42, "j1", 3, "job.started", payload) == (
        b'[42,"j1",3,"job.started"]\n' + payload
    )


def test_canonical_bytes_are_unambiguous_whatever_the_fields_hold() -> None:
    """Fields holding newlines cannot be shifted into one another to forge the same bytes."""
    assert canonical_bytes(1, "a\n2", 3, "t", b"") != canonical_bytes(1, "a", 2, "3\nt", b"")


def test_link_is_sha256_of_the_previous_hash_then_the_canonical_bytes() -> None:
    """Each hash is sha256 over the previous hex hash (ascii) and the canonical bytes."""
    payload = b'{"x":1}'
    header = b'[1,"j1",1,"job.created"]\n'
    expected = hashlib.sha256(GENESIS.encode("ascii") + header + payload)
    assert link(GENESIS, 1, "j1", 1, "job.created", payload) == expected.hexdigest()
    assert GENESIS == "0" * 64


def test_a_good_chain_verifies() -> None:
    """An untouched chain is ok, counts every row and ends on the last row's hash."""
    rows = good_chain()
    report = verify(rows)
    assert report.ok
    assert (report.checked, report.first_bad_seq, report.reason) == (6, None, "")
    assert report.last_hash == rows[-1].hash


def test_an_empty_chain_verifies() -> None:
    """No rows is a valid (empty) log whose head is the genesis hash."""
    report = verify([])
    assert (report.ok, report.checked, report.last_hash) == (True, 0, GENESIS)


def test_a_chain_copied_from_mid_log_verifies_from_its_predecessor_hash() -> None:
    """A slice of the log verifies when given the hash of the row before it."""
    rows = good_chain()
    assert verify(rows[3:], prev_hash=rows[2].hash).ok
    assert verify(rows[3:]).first_bad_seq == 4


def test_seq_gaps_are_allowed_when_the_hashes_link() -> None:
    """The chain orders by seq but does not require consecutive seqs."""
    rows = relinked(
        [ChainRow(r.seq * 10, r.job_id, r.version, r.type_tag, r.payload, "") for r in good_chain()]
    )
    assert verify(rows).ok


def test_an_altered_payload_names_its_seq() -> None:
    """Editing one stored payload is caught at that row."""
    rows = good_chain()
    r = rows[3]
    rows[3] = ChainRow(
        r.seq, r.job_id, r.version, r.type_tag, r.payload.replace(b"0.5", b"0.9"), r.hash
    )
    report = verify(rows)
    assert (report.ok, report.first_bad_seq, report.checked) == (False, 4, 3)
    assert report.reason == "hash does not match its content"


def test_an_altered_header_column_names_its_seq() -> None:
    """Editing the job id, version or type column of a row is caught at that row."""
    for changes in ({"job_id": "b"}, {"version": 9}, {"type_tag": "job.failed"}):
        rows = good_chain()
        r = rows[2]
        fields = {
            "seq": r.seq,
            "job_id": r.job_id,
            "version": r.version,
            "type_tag": r.type_tag,
            "payload": r.payload,
            "hash": r.hash,
            **changes,
        }
        rows[2] = ChainRow(**fields)  # type: ignore[arg-type]
        assert verify(rows).first_bad_seq == 3, changes


def test_an_altered_hash_names_its_seq() -> None:
    """Replacing a stored hash breaks that row (and would break the next one too)."""
    rows = good_chain()
    r = rows[1]
    rows[1] = ChainRow(r.seq, r.job_id, r.version, r.type_tag, r.payload, "f" * 64)
    report = verify(rows)
    assert (report.first_bad_seq, report.reason) == (2, "hash does not match its content")


def test_a_deleted_row_names_the_seq_after_the_gap() -> None:
    """Deleting a row in the middle breaks the link of the row that followed it."""
    rows = good_chain()
    del rows[2]
    report = verify(rows)
    assert (report.first_bad_seq, report.checked) == (4, 2)


def test_a_deleted_first_row_is_caught() -> None:
    """Deleting the first row leaves the second linked to a hash that is not genesis."""
    assert verify(good_chain()[1:]).first_bad_seq == 2


def test_a_deleted_last_row_shows_only_in_the_head_hash() -> None:
    """Truncation verifies by itself; it shows as a head hash that differs from the known one."""
    rows = good_chain()
    report = verify(rows[:-1])
    assert report.ok
    assert report.last_hash != rows[-1].hash


def test_reordered_rows_name_the_first_row_out_of_place() -> None:
    """Swapping two stored rows is caught at the first row that moved."""
    rows = good_chain()
    rows[2], rows[3] = rows[3], rows[2]
    report = verify(rows)
    assert (report.first_bad_seq, report.reason) == (4, "hash does not match its content")


def test_a_relinked_chain_out_of_seq_order_is_caught() -> None:
    """Rows rewritten with fresh hashes in a new order still fail on their seq order."""
    rows = good_chain()
    rows[2], rows[3] = rows[3], rows[2]
    report = verify(relinked(rows))
    assert (report.first_bad_seq, report.reason) == (3, "seq out of order")


def test_a_duplicated_seq_is_caught() -> None:
    """Two rows with the same seq cannot both be in the log."""
    rows = good_chain()
    report = verify(relinked([*rows[:3], rows[2], *rows[3:]]))
    assert (report.first_bad_seq, report.reason) == (3, "seq out of order")
