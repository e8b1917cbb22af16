"""The bundled workflows' throughput against references measured in the same run.

- csv_summary MB/s against `csv.reader` merely reading the same file (target >= 0.25x).
- compress MB/s (gzip, sha256 of both sides, the verify pass, the manifest) against the
  `gzip` command at the same level, `gzip -c -6 file > /dev/null` (target >= 0.7x).

Each figure is the best of `--rounds`, the two sides interleaved, in wall time and in CPU
time (the CPU figures hold up better on a busy machine). The processors run directly on a
real job context, so the kernel's own costs are not counted.

    .venv/bin/python tests/benchmarks/bench_workflows.py [--csv-mb 50] [--gzip-mb 64]
"""

from __future__ import annotations

import argparse
import csv
import functools
import random
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from adapters.context import FileJobContext
from kernel.state import Job
from kernel.task import BaseProcessor
from workflows.compress import processor as compress_processor
from workflows.csv_summary import processor as csv_processor

Timing = tuple[float, float]  # wall seconds, CPU seconds


def orders_csv(path: Path, size_bytes: int) -> None:
    """A sales log: unique ids, dates, 20k customers, countries, SKUs, ints, prices, notes."""
    rnd = random.Random(7)
    countries = ["VN", "US", "DE", "FR", "JP", "KR", "GB", "IN", "BR", "AU", "CA", "SG"]
    start = date(2025, 1, 1)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["order_id", "date", "customer", "country", "product", "quantity",
                         "unit_price", "status", "note"])
        row = 0
        while out.tell() < size_bytes:
            writer.writerows(
                [100_000 + i, (start + timedelta(days=rnd.randrange(365))).isoformat(),
                 f"cust{rnd.randrange(20_000)}", rnd.choice(countries),
                 f"SKU-{rnd.randrange(300):04d}", rnd.randint(1, 10),
                 f"{rnd.randrange(100, 100_000) / 100:.2f}",
                 rnd.choice(("paid", "shipped", "delivered", "refunded")),
                 "gift" if rnd.random() < 0.05 else ""] for i in range(row, row + 10_000))
            row += 10_000


def unique_csv(path: Path, size_bytes: int) -> None:
    """The hard case: every column near-unique, half of them floats."""
    rnd = random.Random(8)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "score", "name", "ratio"])
        row = 0
        while out.tell() < size_bytes:
            writer.writerows([i, f"{rnd.gauss(50, 10):.4f}", f"user{rnd.randrange(10**9)}",
                              f"{rnd.random():.6f}"] for i in range(row, row + 10_000))
            row += 10_000


def mixed_bytes(path: Path, size_bytes: int) -> None:
    """Half log-like text, half random bytes, in 1 MiB runs."""
    rnd = random.Random(9)
    words = [b"GET", b"POST", b"/api/jobs", b"200", b"404", b"multiflow", b"user=42", b"\n"]
    with path.open("wb") as out:
        while out.tell() < size_bytes:
            out.write(b" ".join(rnd.choice(words) for _ in range(200_000))[:2**20])
            out.write(rnd.randbytes(2**20))


def timed(action: Callable[[], Any]) -> Timing:
    """Wall and CPU seconds of one call (CPU: this process and its waited-for children)."""
    wall, cpu = time.perf_counter(), _cpu_s()
    action()
    return time.perf_counter() - wall, _cpu_s() - cpu


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_processor(processor: BaseProcessor, workflow: str, path: Path, params: dict[str, Any],
                  data_dir: Path) -> None:
    """One job's work, on a real FileJobContext, outside the kernel."""
    now = datetime.now(UTC)
    job = Job(id="bench", workflow_name=workflow, file_path=f"{workflow}/input/{path.name}",
              current_path=f"{workflow}/processing/bench--{path.name}", created_at=now,
              updated_at=now)
    ctx = FileJobContext(job, data_dir, path, lambda fraction, message: None, lambda: False)
    processor.process(ctx, processor.parse_task(params))


def read_csv(path: Path) -> None:
    """The reference: csv.reader over the file, every row read and dropped."""
    with path.open(newline="", encoding="utf-8") as source:
        for _ in csv.reader(source):
            pass


def gzip_command(path: Path, level: int) -> None:
    """The reference: `gzip -c -LEVEL file > /dev/null`."""
    with open("/dev/null", "wb") as sink:
        subprocess.run(["gzip", "-c", f"-{level}", str(path)], stdout=sink, check=True)


def best(rounds: int, ours: Callable[[], Any], reference: Callable[[], Any]) -> list[float]:
    """Best wall and CPU seconds of each side over interleaved rounds: ours, then reference."""
    mine: list[Timing] = []
    theirs: list[Timing] = []
    for _ in range(rounds):
        mine.append(timed(ours))
        theirs.append(timed(reference))
    return [min(t[i] for t in side) for side in (mine, theirs) for i in (0, 1)]


def report(label: str, size_bytes: int, figures: list[float], target: float) -> None:
    """Print MB/s of both sides and the ratio, in wall and in CPU time."""
    ours_wall, ours_cpu, ref_wall, ref_cpu = figures
    mb = size_bytes / 1e6
    for kind, ours, ref in (("wall", ours_wall, ref_wall), ("cpu ", ours_cpu, ref_cpu)):
        ratio = ref / ours
        verdict = "meets" if ratio >= target else "MISSES"
        print(f"{label:34} {kind} ours {mb / ours:8.1f} MB/s  reference {mb / ref:8.1f} MB/s  "
              f"ratio {ratio:5.2f}x ({verdict} target {target}x)")


def main() -> None:
    """Generate the inputs, run both benchmarks, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv-mb", type=int, default=50)
    parser.add_argument("--gzip-mb", type=int, default=64)
    parser.add_argument("--level", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("gzip") is None:
        raise SystemExit("the gzip command is needed for the reference")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, make in (("csv_summary (sales log, 9 columns)", orders_csv),
                            ("csv_summary (4 near-unique columns)", unique_csv)):
            path = root / f"{make.__name__}.csv"
            make(path, args.csv_mb * 2**20)
            figures = best(args.rounds,
                           functools.partial(run_processor, csv_processor, "csv_summary",
                                             path, {}, root),
                           functools.partial(read_csv, path))
            report(label, path.stat().st_size, figures, 0.25)
        path = root / "mixed.bin"
        mixed_bytes(path, args.gzip_mb * 2**20)
        figures = best(args.rounds, lambda: run_processor(
            compress_processor, "compress", path, {"level": args.level}, root),
            lambda: gzip_command(path, args.level))
        report(f"compress level {args.level} (half text)", path.stat().st_size, figures, 0.7)


if __name__ == "__main__":
    main()
