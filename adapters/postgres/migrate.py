"""`multiflow migrate-store`: copy an SQLite log into PostgreSQL, chain and all.

Events are copied byte for byte (the payload is text in both stores), so every
hash still links; the job read model is rebuilt on the target by folding the
copied events, and the target's chain is verified against the source's head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import psycopg

from adapters.audit import verify_chain
from adapters.postgres.store import PostgresEventStore, translate, write_rows
from adapters.sqlite import SqliteEventStore
from kernel.chain import ChainRow
from kernel.events import decode_event
from kernel.ports import StoreError
from kernel.state import Job, StoredEvent, apply

PAGE_EVENTS = 5000


class MigrationReport(msgspec.Struct, frozen=True, kw_only=True):
    """What was copied, and the head hash both stores agree on."""

    events: int
    jobs: int
    checkpoints: int
    head_hash: str


async def migrate_store(source_path: Path, target_url: str,
                        progress: Callable[[int, int], None] | None = None) -> MigrationReport:
    """Copy the SQLite log at `source_path` into an EMPTY PostgreSQL store at `target_url`."""
    source = await SqliteEventStore.open(source_path, readonly=True)
    target = await PostgresEventStore.open(target_url)
    try:
        if await target.last_seq() != 0:
            raise StoreError("the target already holds events: migrate into an empty schema")
        source_report = await verify_chain(source)
        if not source_report.ok:
            raise StoreError(f"the source log does not verify at seq "
                             f"{source_report.first_bad_seq}: {source_report.reason}")
        total = await source.last_seq()
        jobs = await _copy(source, target, total, progress)
        checkpoints = await _copy_checkpoints(source, target)
        copied = await verify_chain(target)
        if not copied.ok or copied.last_hash != source_report.last_hash:
            raise StoreError("the copy does not verify against the source's head hash")
        return MigrationReport(events=copied.checked, jobs=jobs, checkpoints=checkpoints,
                               head_hash=copied.last_hash)
    finally:
        await source.close()
        await target.close()


async def _copy(source: SqliteEventStore, target: PostgresEventStore, total: int,
                progress: Callable[[int, int], None] | None) -> int:
    jobs: dict[str, Job] = {}
    after = 0
    while rows := await source.read_chain(after, PAGE_EVENTS):
        folded: dict[str, Job] = {}
        for row in rows:
            stored = StoredEvent(seq=row.seq, job_id=row.job_id, version=row.version,
                                 event=decode_event(row.payload), hash=row.hash)
            jobs[row.job_id] = folded[row.job_id] = apply(jobs.get(row.job_id), stored)
        await _write(target, rows, list(folded.values()))
        after = rows[-1].seq
        if progress is not None:
            progress(after, total)
    return len(jobs)


async def _write(target: PostgresEventStore, rows: list[ChainRow], jobs: list[Job]) -> None:
    events: list[tuple[object, ...]] = [
        (r.seq, r.job_id, r.version, r.type_tag, decode_event(r.payload).at.isoformat(),
         r.payload.decode(), r.hash, "migrate-store") for r in rows]
    try:
        async with target._pool.connection() as conn, conn.transaction():
            await write_rows(conn, events, jobs)
    except psycopg.Error as exc:
        raise translate(exc, target.where) from exc


async def _copy_checkpoints(source: SqliteEventStore, target: PostgresEventStore) -> int:
    rows = await source._fetch("SELECT name, seq FROM checkpoints")
    for name, seq in rows:
        await target.set_checkpoint(name, seq)
    return len(rows)
