"""`multiflow migrate-store`: copy an SQLite log into PostgreSQL, chain and all.

Events are copied byte for byte (the payload is text in both stores), so every
hash still links; the job read model is rebuilt on the target by folding the
copied events, and the target's chain is verified against the source's head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg

from adapters.audit import verify_chain
from adapters.postgres.store import PostgresEventStore, translate, write_rows
from adapters.sqlite import SqliteEventStore
from kernel.chain import ChainRow
from kernel.events import decode_event
from kernel.ports import StoreError, StoreUnavailable
from kernel.state import Job, StoredEvent, apply

PAGE_EVENTS = 5000


class MigrationReport(msgspec.Struct, frozen=True, kw_only=True):
    """What was copied, and the head hash both stores agree on."""

    events: int
    jobs: int
    checkpoints: int
    dead_letters: int = 0
    alerts: int = 0
    head_hash: str


# The notifier's state beside the log, copied with it.
SIDE_TABLES: dict[str, tuple[str, ...]] = {
    "checkpoints": ("name", "seq", "updated_at"),
    "dead_letters": ("id", "target", "seq", "job_id", "event_type", "attempts", "last_error",
                     "created_at"),
    "alerts": ("id", "rule", "state", "at", "detail"),
}


async def migrate_store(source_path: Path, target_url: str,
                        progress: Callable[[int, int], None] | None = None) -> MigrationReport:
    """Copy the SQLite log at `source_path` into an EMPTY PostgreSQL store at `target_url`.

    The source is opened as its writer, so the copy is refused (StoreLocked) while a
    server runs on it (the events it wrote after the copy would be lost), and a log of
    an older schema is brought up to date first. The whole copy is one transaction on
    the target, under the log's lock: interrupted, it leaves the target empty, and the
    migration can simply run again.
    """
    if not await anyio.Path(source_path).is_file():
        raise StoreUnavailable(f"no event log at {source_path}")
    source = await SqliteEventStore.open(source_path)
    try:
        target = await PostgresEventStore.open(target_url)
        try:
            return await _migrate(source, target, progress)
        finally:
            await target.close()
    finally:
        await source.close()


async def _migrate(source: SqliteEventStore, target: PostgresEventStore,
                   progress: Callable[[int, int], None] | None) -> MigrationReport:
    source_report = await verify_chain(source)
    if not source_report.ok:
        raise StoreError(f"the source log does not verify at seq "
                         f"{source_report.first_bad_seq}: {source_report.reason}")
    total = await source.last_seq()
    try:
        async with target._pool.connection() as conn, conn.transaction():
            await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            held = await (await conn.execute("SELECT count(*) FROM events")).fetchone()
            if held is not None and held[0]:
                raise StoreError("the target already holds events: migrate into an empty "
                                 "schema")
            # A node started once on the empty target left its own bookkeeping (a webhook's
            # checkpoint at 0): the source's replaces it.
            for table in SIDE_TABLES:
                await conn.execute(f"DELETE FROM {table}")
            jobs = await _copy(source, conn, total, progress)
            copied_rows = {table: await _copy_table(source, conn, table, columns)
                           for table, columns in SIDE_TABLES.items()}
    except psycopg.Error as exc:
        raise translate(exc, target.where) from exc
    copied = await verify_chain(target)
    if not copied.ok or copied.last_hash != source_report.last_hash:
        raise StoreError("the copy does not verify against the source's head hash")
    return MigrationReport(events=copied.checked, jobs=jobs,
                           checkpoints=copied_rows["checkpoints"],
                           dead_letters=copied_rows["dead_letters"],
                           alerts=copied_rows["alerts"], head_hash=copied.last_hash)


async def _copy(source: SqliteEventStore, conn: psycopg.AsyncConnection[Any], total: int,
                progress: Callable[[int, int], None] | None) -> int:
    jobs: dict[str, Job] = {}
    after = 0
    while rows := await source.read_chain(after, PAGE_EVENTS):
        folded: dict[str, Job] = {}
        for row in rows:
            stored = StoredEvent(seq=row.seq, job_id=row.job_id, version=row.version,
                                 event=decode_event(row.payload), hash=row.hash)
            jobs[row.job_id] = folded[row.job_id] = apply(jobs.get(row.job_id), stored)
        await write_rows(conn, _event_rows(rows), list(folded.values()))
        after = rows[-1].seq
        if progress is not None:
            progress(after, total)
    return len(jobs)


def _event_rows(rows: list[ChainRow]) -> list[tuple[object, ...]]:
    return [(r.seq, r.job_id, r.version, r.type_tag, decode_event(r.payload).at.isoformat(),
             r.payload.decode(), r.hash, "migrate-store") for r in rows]


async def _copy_table(source: SqliteEventStore, conn: psycopg.AsyncConnection[Any],
                      table: str, columns: tuple[str, ...]) -> int:
    """Copy a table beside the log as it is (ids kept: a dead letter is redelivered by its
    id), and move the target's id sequence past them."""
    names = ", ".join(columns)
    rows = await source._fetch(f"SELECT {names} FROM {table}")
    if rows:
        marks = ", ".join(["%s"] * len(columns))
        cur = conn.cursor()
        await cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})",
                              [tuple(row) for row in rows])
        if "id" in columns:
            await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                               f"(SELECT max(id) FROM {table}))")
    return len(rows)
