"""Rebuild of a 1,000,000-event log: events/s and peak RSS.

Reference, measured in the same run: decoding the same payloads with msgspec and
nothing else (the floor any replay pays). Target: >= 300,000 events/s, peak RSS of
the rebuild <= 250 MB.

    .venv/bin/python tests/benchmarks/bench_rebuild.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import resource
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from adapters.sqlite import SqliteEventStore
from kernel.events import JobCompleted, JobCreated, JobStarted, decode_event


async def fill(path: Path, events_total: int) -> None:
    """Write a log of created/started/completed triples through the real append path."""
    store = await SqliteEventStore.open(path)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    jobs = events_total // 3
    batch: list = []
    from kernel.ports import Append

    for i in range(jobs):
        at = t0 + timedelta(milliseconds=i)
        job_id = f"job-{i:08d}"
        batch.append(Append(job_id, [
            JobCreated(job_id=job_id, at=at, workflow_name="bench",
                       file_path=f"bench/input/{i}.csv", priority=i % 7, params={"level": 6}),
            JobStarted(job_id=job_id, at=at, attempt=1),
            JobCompleted(job_id=job_id, at=at, attempt=1, result={"rows": i},
                         output_paths=[f"bench/output/{i}.json"]),
        ], 0))
        if len(batch) == 5000:
            await store.append_batch(batch)
            batch = []
    if batch:
        await store.append_batch(batch)
    await store.close()


def decode_reference(path: Path) -> float:
    """Events/s of decoding every payload and nothing else."""
    conn = sqlite3.connect(path)
    started = time.perf_counter()
    count = 0
    cursor = conn.execute("SELECT payload FROM events ORDER BY seq")
    while rows := cursor.fetchmany(50_000):
        for (payload,) in rows:
            decode_event(payload)
        count += len(rows)
    conn.close()
    return count / (time.perf_counter() - started)


async def rebuild(path: Path) -> tuple[float, int, int]:
    store = await SqliteEventStore.open(path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = await store.rebuild()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await store.close()
    return report.events_per_s, report.events, max(rss_before, rss_after)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        started = time.perf_counter()
        anyio.run(fill, path, args.events)
        print(f"filled {args.events:,} events in {time.perf_counter() - started:.1f} s")
        reference = decode_reference(path)
        per_s, events, rss_kb = anyio.run(rebuild, path)
        print(f"rebuild: {events:,} events at {per_s:,.0f} events/s "
              f"(target >= 300,000); peak RSS {rss_kb / 1024:.0f} MB (target <= 250)")
        print(f"reference, msgspec decode only: {reference:,.0f} events/s; "
              f"ratio {per_s / reference:.2f}")


if __name__ == "__main__":
    main()
