"""One life of the process that the crash tests kill: open, recover, submit input/, run to the end.

Run as `python crash_child.py DATA_DIR --files N [options]`. On its first life it
drops N input files into `DATA_DIR/crash/input/` (then writes the `seeded` marker,
the parent's cue that it may kill); every life submits whatever still lies in
input/ (a file with an active job gets that job back), then waits until every job
is finished and exits 0. Exit 3: the deadline passed with jobs still active.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters.bootstrap import Kernel  # noqa: E402
from kernel.config import WorkflowConfig  # noqa: E402
from kernel.task import BaseProcessor, JobContext  # noqa: E402

WORKFLOW = "crash"
SEEDED_MARKER = "seeded"
SUBMIT_CONCURRENCY = 64
EXIT_DEADLINE = 3


def input_name(index: int) -> str:
    """The name of the `index`-th input file."""
    return f"f{index:05d}.dat"


def input_bytes(index: int) -> bytes:
    """The content of the `index`-th input file: sizes vary from ~20 bytes to ~8 KB."""
    line = f"input {index} of the crash test\n".encode()
    return line * (1 + (index * 37) % 300)


def output_name(name: str) -> str:
    """The output a job writes for an input named `name`."""
    return f"{name}.out"


def output_bytes(data: bytes) -> bytes:
    """What the processor writes for an input: a digest line, then the input reversed."""
    return hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1]


class CrashProcessor(BaseProcessor):
    """Writes one output per input in two halves (a kill can land between them)."""

    def __init__(self, poison: str | None) -> None:
        self.poison = poison

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        """Copy the input to its output; `os._exit(1)` on the poison file."""
        name = ctx.input_path.name.partition("--")[2]
        if name == self.poison:
            os._exit(1)  # the whole process dies, as a segfaulting library would
        data = ctx.input_path.read_bytes()
        body = output_bytes(data)
        half = len(body) // 2
        with ctx.open_output(output_name(name)) as handle:
            handle.write(body[:half])
            ctx.progress(0.5, "half written")
            time.sleep(0.001)
            handle.write(body[half:])
        return {"bytes": len(body)}


def seed(inbox: Path, count: int, marker: Path) -> None:
    """Drop the input files once; the marker says they are all there."""
    if marker.exists():
        return
    inbox.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (inbox / input_name(index)).write_bytes(input_bytes(index))
    marker.write_text("ok\n")


def inbox_names(inbox: Path) -> list[str]:
    """The files in input/ now, by name."""
    return sorted(p.name for p in inbox.iterdir() if p.is_file())


async def submit_inbox(kernel: Kernel, inbox: Path) -> tuple[int, int, int]:
    """Submit every file still in input/; (created, existing, gone meanwhile)."""
    names = await anyio.to_thread.run_sync(inbox_names, inbox)
    counts = [0, 0, 0]
    limiter = anyio.Semaphore(SUBMIT_CONCURRENCY)

    async def one(name: str) -> None:
        async with limiter:
            try:
                submitted = await kernel.submit_file(WORKFLOW, name)
            except LookupError:  # FileNotInInput (its home module has moved before)
                counts[2] += 1  # claimed into processing/ while we listed
                return
            counts[0 if submitted.created else 1] += 1

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(one, name)
    return counts[0], counts[1], counts[2]


async def wait_until_done(kernel: Kernel, expected: int, deadline_s: float) -> bool:
    """Poll the read model until `expected` jobs exist and none is active."""
    with anyio.move_on_after(deadline_s):
        while True:
            counts = await kernel.store.count_jobs()
            active = sum(n for (_, status), n in counts.items() if status in ("pending", "running"))
            if active == 0 and sum(counts.values()) >= expected:
                return True
            await anyio.sleep(0.05)
    print(f"deadline passed: {await kernel.store.count_jobs()}", flush=True)
    return False


async def life(args: argparse.Namespace) -> int:
    """One life of the child, from open to a clean exit."""
    data_dir = Path(args.data_dir)
    inbox = data_dir / WORKFLOW / "input"
    seed(inbox, args.files, data_dir / SEEDED_MARKER)
    config = WorkflowConfig(max_attempts=args.max_attempts, backoff_base_s=args.backoff_s,
                            backoff_max_s=max(args.backoff_s, 0.5), timeout_s=60.0)
    started_s = time.monotonic()
    async with Kernel.open(data_dir=data_dir, concurrency=args.concurrency,
                           drain_grace_s=5.0) as kernel:
        kernel.register_workflow(WORKFLOW, CrashProcessor(args.poison), config=config)
        await kernel.ready(WORKFLOW)
        print(f"pid {os.getpid()} ready after {time.monotonic() - started_s:.2f}s", flush=True)
        created, existing, gone = await submit_inbox(kernel, inbox)
        print(f"submitted: created={created} existing={existing} gone={gone}", flush=True)
        done = await wait_until_done(kernel, args.files, args.deadline_s)
    print(f"closed after {time.monotonic() - started_s:.2f}s", flush=True)
    return 0 if done else EXIT_DEADLINE


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and live once."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir")
    parser.add_argument("--files", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-attempts", type=int, default=50)
    parser.add_argument("--backoff-s", type=float, default=0.01)
    parser.add_argument("--poison", default=None, help="the input name whose job kills us")
    parser.add_argument("--deadline-s", type=float, default=90.0)
    args = parser.parse_args(argv)
    return anyio.run(life, args)


if __name__ == "__main__":
    sys.exit(main())
