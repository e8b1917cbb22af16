"""Rebuild of a 1,000,000-event log: events/s and peak RSS.

Reference, measured in the same run right before each rebuild: decoding the same payloads
with msgspec and nothing else, in one thread (the floor any replay pays). Target:
>= 300,000 events/s, peak RSS of the rebuild <= 250 MB. The rebuild runs in a child
process (its RSS is its own, and that of its worker processes is counted too: the
largest of them) and uses every core, so on a busy machine it loses more to other work
than the one-thread reference does: compare medians of several rounds.

Each round rebuilds twice: the read model as the appends left it (right: the rebuild
compares every row and writes none), and the read model emptied first, outside the
timing (every row written: the worst case, as after a lost or dropped table).

    .venv/bin/python tests/benchmarks/bench_rebuild.py [--events 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import statistics
import subprocess
import sys
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


def rebuild(path: Path, emptied: bool = False) -> tuple[float, int, float]:
    """Run `multiflow rebuild` in a child process: (events/s, events, peak RSS in MB)."""
    # The store may still count its opening read as in flight for a moment (StoreUnavailable
    # "rebuild while appends are in flight"): the child retries for up to a second.
    code = ("import anyio, json; from adapters.sqlite import SqliteEventStore\n"
            "from kernel.ports import StoreUnavailable\n"
            "import sqlite3\n"
            "async def go():\n"
            f"    if {emptied!r}:\n"
            f"        conn = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "        conn.execute('DELETE FROM jobs')\n"
            "        conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')\n"
            "        conn.close()\n"
            f"    store = await SqliteEventStore.open({str(path)!r})\n"
            "    for attempt in range(100):\n"
            "        try:\n"
            "            report = await store.rebuild()\n"
            "            break\n"
            "        except StoreUnavailable:\n"
            "            if attempt == 99: raise\n"
            "            await anyio.sleep(0.01)\n"
            "    await store.close()\n"
            "    print(json.dumps([report.events_per_s, report.events]))\n"
            "anyio.run(go)\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=600).stdout
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    per_s, events = json.loads(out.strip().splitlines()[-1])
    return per_s, events, max(peak_kb, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        started = time.perf_counter()
        anyio.run(fill, path, args.events)
        print(f"filled {args.events:,} events in {time.perf_counter() - started:.1f} s")
        rounds, emptied = [], []
        for number in range(1, args.rounds + 1):
            reference = decode_reference(path)
            per_s, events, rss_mb = rebuild(path)
            rounds.append((per_s, reference, rss_mb))
            empty_per_s, _, empty_rss_mb = rebuild(path, emptied=True)
            emptied.append((empty_per_s, empty_rss_mb))
            print(f"round {number}: rebuild {per_s:,.0f} events/s, reference {reference:,.0f} "
                  f"events/s, ratio {per_s / reference:.2f}; from an emptied read model "
                  f"{empty_per_s:,.0f} events/s")
        per_s = statistics.median(r[0] for r in rounds)
        reference = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[0] / r[1] for r in rounds)
        rss = max(max(r[2] for r in rounds), max(r[1] for r in emptied))
        print(f"rebuild: {events:,} events at {per_s:,.0f} events/s, median of {len(rounds)} "
              f"(target >= 300,000); peak RSS of the rebuilding process "
              f"{rss:.0f} MB (target <= 250)")
        print(f"from an emptied read model (every row written): "
              f"{statistics.median(r[0] for r in emptied):,.0f} events/s, median")
        print(f"reference, msgspec decode only: {reference:,.0f} events/s; ratio {ratio:.2f}")

if __name__ == "__main__":
    main()
