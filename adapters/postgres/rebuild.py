"""`multiflow rebuild` on PostgreSQL: drop the read model and replay the log into it.

Refused while any node's lease is live (a running node writes the read model); the
whole rebuild is one transaction, so a failure leaves the old read model in place.
"""

from __future__ import annotations

import time

import psycopg
from psycopg_pool import PoolTimeout

from adapters.postgres.store import PostgresEventStore, translate
from adapters.sqlite.rebuild import RebuildReport
from adapters.sqlrows import UPSERT_JOB, job_row
from kernel.events import decode_event
from kernel.ports import StoreLocked
from kernel.state import Job, fold_stored

FETCH_ROWS = 10_000


async def rebuild(store: PostgresEventStore) -> RebuildReport:
    """Replay every event into an empty `jobs` table; report how fast."""
    live = await store.live_nodes()
    if live:
        raise StoreLocked(f"nodes {', '.join(sorted(live))} run on this log; stop them "
                          "(or wait until their leases expire)")
    started = time.perf_counter()
    jobs: dict[str, Job] = {}
    events = 0
    try:
        async with store._pool.connection() as conn, conn.transaction():
            await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            await conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            await conn.execute("DELETE FROM jobs")
            async with conn.cursor(name="multiflow_rebuild") as cursor:
                await cursor.execute("SELECT seq, job_id, version, payload FROM events "
                                     "ORDER BY seq")
                while rows := await cursor.fetchmany(FETCH_ROWS):
                    for seq, job_id, version, payload in rows:
                        jobs[job_id] = fold_stored(jobs.get(job_id), decode_event(payload),
                                                   seq, version)
                    events += len(rows)
            async with conn.cursor() as cursor:
                await cursor.executemany(UPSERT_JOB, [job_row(job) for job in jobs.values()])
    except (psycopg.Error, PoolTimeout) as exc:
        raise translate(exc, store.where) from exc
    return RebuildReport(events=events, jobs=len(jobs), seconds=time.perf_counter() - started)
