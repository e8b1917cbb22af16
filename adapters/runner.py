"""`multiflow run`: the server process, started and stopped in the design's order."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import click
import structlog

from adapters.bootstrap import Kernel
from adapters.logs import configure_logging

log = structlog.get_logger("multiflow.run")


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("data"), show_default=True, envvar="MULTIFLOW_DATA_DIR")
@click.option("--store", default=None, envvar="MULTIFLOW_STORE",
              help="sqlite:///PATH or memory://; default DATA_DIR/multiflow.db.")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=1, show_default=True,
              envvar="MULTIFLOW_CONCURRENCY", help="Jobs running at once, all workflows.")
@click.option("--grace", "grace_s", type=float, default=30.0, show_default=True,
              help="Seconds a running job gets to finish on SIGTERM.")
def run(data_dir: Path, store: str | None, concurrency: int, grace_s: float) -> None:
    """Run multiflow: the event log, the JobManager and the workflows."""
    configure_logging()
    anyio.run(serve, data_dir, store, concurrency, grace_s)


async def serve(data_dir: Path, store: str | None, concurrency: int, grace_s: float) -> None:
    """Run until SIGTERM or SIGINT; a second signal stops at once."""
    async with Kernel.open(store=store, data_dir=data_dir, concurrency=concurrency,
                           drain_grace_s=grace_s) as kernel:
        log.info("started", data_dir=str(data_dir), concurrency=concurrency,
                 workflows=sorted(kernel.manager.workflows))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name, grace_s=grace_s)
                break
    log.info("stopped")
