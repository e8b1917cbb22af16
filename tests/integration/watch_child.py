"""One life of the hot-folder process that test_watch_crash.py kills with SIGKILL.

Run as `python watch_child.py DATA_DIR STATE_DIR`. It opens the kernel on
DATA_DIR/multiflow.db, registers the workflow `stream`, starts its watcher and
writes `STATE_DIR/ready-{pid}` (the parent's cue that this life is watching). The
parent drops files into `DATA_DIR/stream/input/` meanwhile; once it has dropped
them all it writes `STATE_DIR/dropped` with their count, and this life exits 0
as soon as that many jobs exist, none is active and input/ is empty. Exit 3: the
deadline passed first.
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
from kernel.task import BaseProcessor, JobContext, JobError  # noqa: E402

WORKFLOW = "stream"
SETTLE_MS = 100
EXIT_DEADLINE = 3
BAD_PREFIX = "bad-"


def input_name(index: int) -> str:
    """The name of the `index`-th dropped file; every 13th is one the processor refuses."""
    prefix = BAD_PREFIX if index % 13 == 5 else "f-"
    return f"{prefix}{index:05d}.dat"


def input_bytes(index: int) -> bytes:
    """The content of the `index`-th dropped file: ~40 bytes to ~16 KB."""
    return f"dropped file {index} of the watch crash test\n".encode() * (1 + (index * 53) % 400)


def output_name(name: str) -> str:
    """The output a job writes for an input named `name`."""
    return f"{name}.out"


def output_bytes(data: bytes) -> bytes:
    """What the processor writes for an input: its digest, then the input reversed."""
    return hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1]


class StreamProcessor(BaseProcessor):
    """Writes one output per input in two halves (a kill can land between them)."""

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        """Refuse `bad-*` inputs for good; write the output of the others."""
        name = ctx.job.file_path.rpartition("/")[2]
        if name.startswith(BAD_PREFIX):
            raise JobError("BadInput", f"{name} is refused by the processor", retryable=False)
        body = output_bytes(ctx.input_path.read_bytes())
        half = len(body) // 2
        with ctx.open_output(output_name(name)) as handle:
            handle.write(body[:half])
            handle.flush()
            time.sleep(0.002)
            handle.write(body[half:])
        return {"bytes": len(body)}


def expected_count(state_dir: Path) -> int | None:
    """How many files the parent dropped, once it has dropped them all."""
    try:
        return int((state_dir / "dropped").read_text())
    except (FileNotFoundError, ValueError):
        return None


def inbox_is_empty(inbox: Path) -> bool:
    """Whether input/ holds no file at all."""
    return not any(entry.is_file() for entry in os.scandir(inbox))


def wake_watchfiles(inbox: Path) -> None:
    """Make a change in input/ so watchfiles' blocked call returns and the close need not
    wait for its 5 s timeout (a bug: see test_watch.py, the test on closing the kernel)."""
    (inbox / ".closing").write_bytes(b"")
    (inbox / ".closing").unlink()


async def until_done(kernel: Kernel, state_dir: Path, inbox: Path, deadline_s: float) -> bool:
    """Wait until every dropped file has a finished job and input/ is empty."""
    with anyio.move_on_after(deadline_s):
        while True:
            expected = await anyio.to_thread.run_sync(expected_count, state_dir)
            if expected is not None:
                counts = await kernel.store.count_jobs()
                active = sum(n for (_, status), n in counts.items()
                             if status in ("pending", "running"))
                empty = await anyio.to_thread.run_sync(inbox_is_empty, inbox)
                if active == 0 and sum(counts.values()) >= expected and empty:
                    return True
            await anyio.sleep(0.05)
    print(f"deadline passed: {await kernel.store.count_jobs()}", flush=True)
    return False


async def life(args: argparse.Namespace) -> int:
    """One life of the child, from open to a clean exit."""
    data_dir, state_dir = Path(args.data_dir), Path(args.state_dir)
    config = WorkflowConfig(settle_ms=SETTLE_MS, rescan_interval_s=1.0, max_attempts=50,
                            backoff_base_s=0.01, backoff_max_s=0.2, timeout_s=30.0)
    started_s = time.monotonic()
    async with Kernel.open(data_dir=data_dir, concurrency=2, drain_grace_s=2.0) as kernel:
        kernel.register_workflow(WORKFLOW, StreamProcessor(), config=config)
        with anyio.fail_after(30):
            await kernel.start_watchers()
        (state_dir / f"ready-{os.getpid()}").write_text("watching\n")
        print(f"pid {os.getpid()} watching after {time.monotonic() - started_s:.2f}s", flush=True)
        inbox = data_dir / WORKFLOW / "input"
        done = await until_done(kernel, state_dir, inbox, args.deadline_s)
        wake_watchfiles(inbox)
    print(f"pid {os.getpid()} closed after {time.monotonic() - started_s:.2f}s", flush=True)
    return 0 if done else EXIT_DEADLINE


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and live once."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir")
    parser.add_argument("state_dir")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    return anyio.run(life, args)


if __name__ == "__main__":
    sys.exit(main())
