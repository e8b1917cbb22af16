"""No-op job throughput with a webhook target whose receiver hangs, against no webhook at all.

Each round runs N no-op jobs end to end (submitted with 256 in flight, concurrency 8,
until every job is completed) three ways, in a rotating order: with no webhook target;
with one target whose receiver holds every request unanswered (each attempt times out
after 1 s and is retried); and, for reference, with one target whose receiver answers
200 at once (every completion is delivered, with a durable checkpoint per delivery).
The receivers run in a child process, so their threads do not compete with the kernel
for the GIL. Printed per mode: the best and the median round in jobs/s (the machine may
be shared: the rounds interleave the modes so that noise hits them alike) and the
kernel process's CPU seconds per 1,000 jobs (less sensitive to other processes).
Target: hanging >= 0.9x none. For the answering receiver, the time until the target's
checkpoint reached the last event is printed too. Logging is at warning level, as a
quiet production server would run.

    .venv/bin/python -m tests.benchmarks.bench_notify [--jobs 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from adapters import Kernel
from adapters.config import Settings
from adapters.logs import configure_logging
from adapters.notify.service import start_notifications
from adapters.notify.settings import WebhookTarget
from tests.benchmarks.common import NoOp, make_inputs, stopwatch, submit_all

SECRET = "bench-secret"
MODES = ("none", "hanging", "answering")
ROOT = Path(__file__).resolve().parents[2]


class Figures:
    """One run: jobs/s, CPU seconds per 1,000 jobs, seconds until everything was delivered."""

    def __init__(self, rate: float, cpu_per_k_s: float, delivered_s: float) -> None:
        self.rate, self.cpu_per_k_s, self.delivered_s = rate, cpu_per_k_s, delivered_s


async def run_jobs(data_dir: Path, jobs: int, url: str | None, answers: bool) -> Figures:
    """N no-op jobs with or without a target at `url` (whose receiver `answers` or hangs)."""
    names = make_inputs(data_dir, "bench", jobs)
    targets = [] if url is None else [WebhookTarget(
        name="bench", url=url, secret=SECRET, timeout_s=1.0, max_attempts=100,
        backoff_base_s=0.0, events=["completed"])]
    async with Kernel.open(data_dir=data_dir, concurrency=8, drain_grace_s=0) as kernel:
        kernel.register_workflow("bench", NoOp())
        await kernel.ready("bench")
        await start_notifications(kernel, Settings(webhooks=targets))
        cpu_started = time.process_time()
        with stopwatch() as elapsed:
            ids = await submit_all(kernel, "bench", names, 256)
            for job_id in ids:
                await kernel.wait(job_id, timeout_s=600)
        cpu_s = time.process_time() - cpu_started
        delivered_s = await _until_delivered(kernel, elapsed[0]) if answers else 0.0
    return Figures(jobs / elapsed[0], cpu_s / jobs * 1000, delivered_s)


async def _until_delivered(kernel: Kernel, elapsed_s: float) -> float:
    """Seconds from the first submit until the target's checkpoint reached the log's end."""
    last = await kernel.store.last_seq()
    started = time.perf_counter()
    store: Any = kernel.store
    while (await store.get_checkpoint("webhook:bench") or 0) < last:  # noqa: ASYNC110
        await anyio.sleep(0.01)
    return elapsed_s + time.perf_counter() - started


@contextmanager
def receiver_process(mode: str) -> Iterator[str]:
    """A receiver (tests/integration/receiver.py) in a child process; yields its URL."""
    child = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.bench_notify",
                              "--serve", mode], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        url = child.stdout.readline().decode().strip()
        yield f"{url}/{mode}"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def serve(mode: str) -> None:
    """The child's side: serve until stdin closes."""
    from tests.integration.receiver import Receiver

    with Receiver(SECRET) as receiver:
        if mode == "hanging":
            receiver.hang()
        print(receiver.url.removesuffix("/hook"), flush=True)
        sys.stdin.read()


def one(root: Path, mode: str, jobs: int) -> Figures:
    """One measured run of one mode, in a fresh data dir (and receiver)."""
    data_dir = Path(tempfile.mkdtemp(dir=root))
    if mode == "none":
        return anyio.run(run_jobs, data_dir, jobs, None, False)
    with receiver_process(mode) as url:
        return anyio.run(run_jobs, data_dir, jobs, url, mode == "answering")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", choices=["hanging", "answering"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    configure_logging("warning", "json")
    runs: dict[str, list[Figures]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in MODES[round_ % 3:] + MODES[:round_ % 3]:
                figures = one(Path(tmp), mode, args.jobs)
                print(f"  round {round_ + 1} {mode:>9}: {figures.rate:,.0f} jobs/s, "
                      f"{figures.cpu_per_k_s:.2f} CPU s per 1,000 jobs", flush=True)
                runs[mode].append(figures)
    report(runs, args.jobs)


def report(runs: dict[str, list[Figures]], jobs: int) -> None:
    """Best and median per mode, each as a ratio to no webhook."""
    best = {mode: max(f.rate for f in figures) for mode, figures in runs.items()}
    median = {mode: statistics.median(f.rate for f in figures) for mode, figures in runs.items()}
    cpu = {mode: statistics.median(f.cpu_per_k_s for f in figures)
           for mode, figures in runs.items()}
    labels = ("no webhook", "webhook, receiver hangs", "webhook, receiver answers")
    for mode, label in zip(MODES, labels, strict=True):
        print(f"{label + ':':<27} best {best[mode]:,.0f} jobs/s ({best[mode] / best['none']:.2f}x)"
              f", median {median[mode]:,.0f} jobs/s ({median[mode] / median['none']:.2f}x), "
              f"{cpu[mode]:.2f} CPU s per 1,000 jobs ({cpu[mode] / cpu['none']:.2f}x)")
    print("target: hanging >= 0.9x no webhook")
    delivered_s = min(f.delivered_s for f in runs["answering"])
    print(f"answering receiver: every delivery done {delivered_s:.2f} s after the first submit "
          f"({jobs / delivered_s:,.0f} deliveries/s)")


if __name__ == "__main__":
    main()
