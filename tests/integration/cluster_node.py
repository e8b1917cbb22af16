"""One node of the cluster tests and benchmarks: a Kernel on a PostgreSQL store.

    python cluster_node.py STORE_URL DATA_DIR [--node-concurrency N] [--concurrency N]
                           [--sleep-ms MS] [--lease-s S] [--heartbeat-s S] [--no-output]

Registers the workflow `wf`, whose processor sleeps and then writes one output per
input; writes `DATA_DIR/ready-{pid}` once it runs, and runs until SIGTERM (it drains
and exits 0) or SIGKILL. Like `multiflow run`, it logs JSON lines at info level on
stdout, runs on uvloop when that is installed, and freezes its start-up objects out of
the garbage collector's passes once it is up.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters.bootstrap import Kernel  # noqa: E402
from adapters.logs import configure_logging  # noqa: E402
from adapters.runner import freeze_startup_objects  # noqa: E402
from kernel.config import WorkflowConfig  # noqa: E402
from kernel.task import BaseProcessor, JobContext  # noqa: E402


class SleepThenWrite(BaseProcessor):
    """Sleeps (the work), then writes `{input}.out` holding the job id (unless told not to)."""

    def __init__(self, sleep_s: float, output: bool = True) -> None:
        self.sleep_s = sleep_s
        self.output = output

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        if self.sleep_s:
            await anyio.sleep(self.sleep_s)
        if self.output:
            with ctx.open_output(ctx.input_path.name + ".out") as out:
                out.write(ctx.job.id.encode())
        return {}


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir)
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with Kernel.open(args.store, data_dir, concurrency=args.concurrency or None,
                               node_concurrency=args.node_concurrency, lease_s=args.lease_s,
                               heartbeat_s=args.heartbeat_s, drain_grace_s=10) as kernel:
            kernel.register_workflow("wf", SleepThenWrite(args.sleep_ms / 1000, not args.no_output),
                                     config=WorkflowConfig(max_attempts=10, backoff_base_s=0.1))
            await kernel.ready("wf")
            freeze_startup_objects()  # as `multiflow run` does once it is up
            (data_dir / f"ready-{os.getpid()}").write_text(kernel.manager.worker_name)
            async for _ in signals:
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("data_dir")
    parser.add_argument("--node-concurrency", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=0)
    parser.add_argument("--sleep-ms", type=float, default=5)
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--heartbeat-s", type=float, default=0.3)
    parser.add_argument("--no-output", action="store_true", help="the processor only sleeps")
    parser.add_argument("--log-level", default="info")
    arguments = parser.parse_args()
    configure_logging(arguments.log_level, "json")
    try:
        import uvloop  # noqa: F401
        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    anyio.run(main, arguments, backend_options=options)
