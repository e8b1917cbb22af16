"""`multiflow run`: the server process, started and stopped in the design's order.

Start: settings -> event store -> JobManager (rebuilt from the log) -> workflows
(each recovered as it registers) -> HTTP server -> watchers.
SIGTERM/SIGINT: stop claiming and watching, /readyz answers 503, running jobs get
the grace period, then are recorded as interrupted; SSE streams close; exit 0.
A second signal exits at once; recovery at the next start handles the rest.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import click
import structlog
import uvicorn
from sse_starlette.sse import AppStatus

from adapters.bootstrap import Kernel
from adapters.config import Settings, SettingsError, load_settings
from adapters.discovery import register_all
from adapters.files import STAGING_IDLE_S
from adapters.http.app import create_app
from adapters.http.security import ensure_tokens
from adapters.http.state import AppState
from adapters.logs import configure_logging
from adapters.maintenance import cleanup_daily
from adapters.notify.service import start_notifications
from adapters.singleton import run_singleton

log = structlog.get_logger("multiflow.run")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the runner owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A multiflow.toml (default: ./multiflow.toml if present).")
@click.option("--data-dir", default=None, help="The data root [default: data].")
@click.option("--store", default=None,
              help="sqlite:///PATH, postgresql://user@host/db?schema=NAME (several nodes) "
                   "or memory:// [default: DATA/multiflow.db].")
@click.option("--host", default=None, help="Address to bind [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: 8000].")
@click.option("--concurrency", type=int, default=None,
              help="Jobs at once, all workflows; in a cluster, on all nodes together [1].")
@click.option("--node-concurrency", type=int, default=None,
              help="In a cluster: jobs at once on this node [--concurrency].")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default=None)
def run(config_file: Path | None, **flags: Any) -> None:
    """Run multiflow: the event log, the JobManager, the workflows, the API and the watchers."""
    try:
        settings = load_settings(config_file, overrides=flags)
        check_bind(settings)
    except SettingsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format,
                      log_dir=settings.data_path / "logs",
                      file_max_bytes=settings.log_file_max_bytes,
                      file_backups=settings.log_file_backups)
    anyio.run(serve, settings, backend_options={"use_uvloop": _uvloop_available()})


def freeze_startup_objects() -> None:
    """Keep what start-up made (modules, classes, functions, the app: ~45,000 objects)
    out of the cyclic garbage collector's full passes, which walked all of it each time
    (20-70 ms with every request waiting) though none of it ever becomes garbage."""
    gc.collect()
    gc.freeze()


def _uvloop_available() -> bool:
    """uvloop (from uvicorn[standard]) makes the server's event loop about twice as fast."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def check_bind(settings: Settings) -> None:
    """`auth = "off"` is accepted only on a loopback address."""
    if settings.auth == "off" and not settings.binds_loopback():
        raise SettingsError(f"auth = \"off\" is refused when binding {settings.host}: "
                            "bind 127.0.0.1 or configure api_tokens")


async def serve(settings: Settings) -> None:
    """Run until a signal; see the module docstring for the order of things."""
    # Signals are taken over first: one that arrives during start-up is kept and acted
    # on as soon as the server is up, instead of killing the process half-started.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        await _serve(settings, signals)
    log.info("stopped")


async def _serve(settings: Settings, signals: Any) -> None:
    tokens, fresh = ensure_tokens(settings)
    if fresh:
        print(f"multiflow: created an API token (kept in {settings.data_dir}/.api-token):\n"
              f"  {fresh}", flush=True)
    async with Kernel.open(store=settings.store, data_dir=settings.data_path,
                           concurrency=settings.concurrency or None,
                           node_concurrency=settings.node_concurrency,
                           lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s,
                           aging_interval_s=settings.aging_interval_s,
                           drain_grace_s=settings.drain_grace_s,
                           scanner=settings.scanner) as kernel:
        state = AppState(kernel=kernel, settings=settings, tokens=tokens,
                         scanner_ping=kernel.scanner.reachable if kernel.scanner else None,
                         starting=True)
        state.workflow_problems.update(register_all(kernel, settings))
        await sweep_staging_at_start(kernel)
        await kernel._tg.start(partial(
            run_singleton, kernel.manager.cluster, "notifications",
            partial(_notify, state), on_stop=partial(setattr, state, "alerts", None)))
        server = _Server(uvicorn.Config(
            create_app(state), host=settings.host, port=settings.port, log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=5))
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_http, server)
            with anyio.fail_after(30):
                # uvicorn offers no start-up event; it sets `started` once it listens
                while not server.started and not server.should_exit:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            if server.should_exit:
                raise SystemExit(f"the HTTP server could not start on "
                                 f"{settings.host}:{settings.port}")
            if settings.watchers:
                await kernel.start_watchers()
            state.starting = False
            upkeep = anyio.CancelScope()
            await tg.start(_upkeep, kernel, settings, upkeep)
            log.info("started", url=f"http://{settings.host}:{settings.port}",
                     data_dir=settings.data_dir, workflows=sorted(kernel.manager.workflows),
                     problems=state.workflow_problems or None)
            freeze_startup_objects()
            await _until_signal(signals)
            upkeep.cancel()
            await _stop(state, server)


async def sweep_staging_at_start(kernel: Kernel) -> None:
    """Before the API answers: remove uploads a crash cut short. Alone on its data root
    (SQLite's writer lock), every staged upload is one; nodes sharing a root leave the
    others' uploads in progress alone (only those unwritten for an hour go)."""
    idle_s = STAGING_IDLE_S if kernel.manager.cluster is not None else 0.0
    for path in await anyio.to_thread.run_sync(kernel.files.sweep_staging, time.time(), idle_s):
        log.info("staging_removed", path=path.name, reason="an upload cut short by a stop")


async def _upkeep(kernel: Kernel, settings: Settings, scope: anyio.CancelScope, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """The daily archive cleanup (on one node of a cluster), in its own scope so that
    shutdown can end it."""

    async def work(tg: anyio.abc.TaskGroup) -> None:
        await tg.start(partial(cleanup_daily, kernel, settings))

    with scope:
        await run_singleton(kernel.manager.cluster, "cleanup", work, task_status=task_status)


async def _notify(state: AppState, tg: anyio.abc.TaskGroup) -> None:
    """Webhooks and alerts (on one node of a cluster)."""
    state.alerts = await start_notifications(state.kernel, state.settings, tg)


async def _serve_http(server: _Server) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits when it cannot bind; we report it and stop
        log.error("http_server_failed")
        server.should_exit = True


async def _until_signal(signals: Any) -> None:
    async for signum in signals:
        log.info("stopping", signal=signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, _exit_now)  # a second signal exits at once
        signal.signal(signal.SIGINT, _exit_now)
        return


def _exit_now(signum: int, frame: Any) -> None:
    os._exit(130 if signum == signal.SIGINT else 143)


async def _stop(state: AppState, server: _Server) -> None:
    state.draining = True
    kernel = state.kernel
    with anyio.CancelScope(shield=True):
        await kernel.stop_watchers()
        await kernel.manager.drain(state.settings.drain_grace_s)
        state.shutdown.set()
        AppStatus.should_exit = True  # sse-starlette ends its streams on this flag

        server.should_exit = True
