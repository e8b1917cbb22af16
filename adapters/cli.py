"""`multiflow ...`: the command line."""

from __future__ import annotations

import re
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import click
from rich.console import Console
from rich.table import Table

from adapters.audit import snapshot_at, verify_chain
from adapters.config import Settings, SettingsError, load_settings
from adapters.sqlite import SqliteEventStore
from kernel.ports import StoreError, StoreLocked, StoreUnavailable

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The data root (holds multiflow.db) [default: the data_dir setting, ./data].")
store_option = click.option(
    "--store", default=None,
    help="Store URL (sqlite:///PATH or postgresql://...) [default: the store setting, else "
         "DATA_DIR/multiflow.db].")


def settings_for(config_file: Path | None = None, **overrides: Any) -> Settings:
    """The effective settings (multiflow.toml, .env, MULTIFLOW_* environment), with the
    command's flags on top; exits 2 with the reason when they are invalid."""
    try:
        return load_settings(config_file, overrides=overrides)
    except SettingsError as exc:
        fail(str(exc), 2)
        raise  # (fail exits)


def where(data_dir: Path | None, store: str | None) -> tuple[Path, str | None]:
    """A command's data root and store: its flags, else the settings, as `multiflow run`
    would use them."""
    found = settings_for(data_dir=str(data_dir) if data_dir else None, store=store)
    return found.data_path, found.store


def is_postgres(store: str | None) -> bool:
    """True for a postgresql:// store URL."""
    return store is not None and store.startswith(("postgresql://", "postgres://"))


async def open_for_reading(store: str | None, data_dir: Path) -> Any:
    """The store a read-only command works on: SQLite (read-only) or PostgreSQL."""
    if is_postgres(store):
        from adapters.postgres import PostgresEventStore

        assert store is not None
        return await PostgresEventStore.open(store)
    return await SqliteEventStore.open(sqlite_path(store, data_dir), readonly=True)


def sqlite_path(store: str | None, data_dir: Path) -> Path:
    """The SQLite file a --store URL or the data dir names."""
    if store is None:
        return data_dir / "multiflow.db"
    if store.startswith("sqlite:///"):
        return Path(store.removeprefix("sqlite:///"))
    raise click.UsageError(f"this command works on an SQLite store; got {store!r}")


def fail(message: str, code: int = 1) -> None:
    """Print an error and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}")
    sys.exit(code)


@click.group()
@click.version_option(package_name="multiflow")
def main() -> None:
    """multiflow: hot folders in, jobs by priority, an auditable event log."""


@main.group()
def audit() -> None:
    """Audits of the event log."""


@audit.command("verify")
@data_dir_option
@store_option
def audit_verify(data_dir: Path | None, store: str | None) -> None:
    """Walk the hash chain; name the first event that was altered. Safe while running."""
    data_dir, store = where(data_dir, store)

    async def run() -> Any:
        opened = await open_for_reading(store, data_dir)
        try:
            return await verify_chain(opened)
        finally:
            await opened.close()

    try:
        report = anyio.run(run)
    except StoreUnavailable as exc:
        fail(str(exc), 2)
    if report.ok:
        console.print(f"[green]ok[/]: {report.checked:,} events, the chain holds "
                      f"(head {report.last_hash[:16]}…)")
        return
    fail(f"the log was altered at seq {report.first_bad_seq}: {report.reason} "
         f"({report.checked:,} events before it verify)")


@main.command()
@data_dir_option
@store_option
def rebuild(data_dir: Path | None, store: str | None) -> None:
    """Replay the log and make the job read model equal to it (refused while a server
    runs, or on PostgreSQL while any node's lease is live)."""
    data_dir, store = where(data_dir, store)

    async def run() -> Any:
        if is_postgres(store):
            from adapters.postgres import PostgresEventStore
            from adapters.postgres.rebuild import rebuild as rebuild_postgres

            assert store is not None
            shared = await PostgresEventStore.open(store)
            try:
                return await rebuild_postgres(shared)
            finally:
                await shared.close()
        path = sqlite_path(store, data_dir)
        if not path.is_file():  # a mistyped --data-dir must not become an empty new log
            raise StoreUnavailable(f"no event log at {path}")
        opened = await SqliteEventStore.open(path)
        try:
            return await opened.rebuild()
        finally:
            await opened.close()

    try:
        report = anyio.run(run)
    except StoreLocked as exc:
        fail(f"{exc}. rebuild needs the store to itself", 2)
    except StoreError as exc:
        fail(str(exc), 2)
    except sqlite3.Error as exc:
        fail(f"the log cannot be used: {exc}. Check it with `multiflow doctor`; `multiflow "
             "restore` puts a backup back", 2)
    console.print(f"rebuilt {report.jobs:,} jobs from {report.events:,} events in "
                  f"{report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)")


@main.command()
@data_dir_option
@store_option
@click.option("--at", "at_", required=True, help="A seq number or an ISO 8601 time (UTC).")
@click.option("--limit", default=50, show_default=True, help="Jobs to list.")
def replay(data_dir: Path | None, store: str | None, at_: str, limit: int) -> None:
    """Show the queue and every job as they were at a past seq or time."""
    data_dir, store = where(data_dir, store)
    seq, when = parse_point(at_)

    async def run() -> Any:
        opened = await open_for_reading(store, data_dir)
        try:
            return await snapshot_at(opened, seq=seq, at=when)
        finally:
            await opened.close()

    try:
        snapshot = anyio.run(run)
    except StoreUnavailable as exc:
        fail(str(exc), 2)
    counts = ", ".join(f"{status} {n}" for status, n in snapshot.counts().items())
    console.print(f"as of seq {snapshot.seq}: {len(snapshot.jobs)} jobs ({counts})")
    console.print(f"queue ({len(snapshot.queue)}): {' '.join(snapshot.queue[:limit]) or '-'}")
    table = Table("job", "workflow", "status", "attempts", "priority", "file")
    for job in list(snapshot.jobs.values())[-limit:]:
        table.add_row(job.id, job.workflow_name, str(job.status), str(job.attempts),
                      str(job.priority), job.current_path)
    console.print(table)


def parse_point(text: str) -> tuple[int | None, datetime | None]:
    """A seq (digits) or a time (ISO 8601; UTC when no offset is given)."""
    if re.fullmatch(r"\d+", text):
        return int(text), None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a seq nor an ISO 8601 time") from None
    return None, when if when.tzinfo else when.replace(tzinfo=UTC)


@main.command("migrate-store")
@data_dir_option
@click.option("--from", "source", default=None,
              help="The SQLite log to copy, a path or sqlite:///PATH "
                   "[default: DATA_DIR/multiflow.db].")
@click.option("--to", "target", required=True,
              help="An empty PostgreSQL store: postgresql://user@host:5432/db?schema=multiflow")
def migrate_store_command(data_dir: Path | None, source: str | None, target: str) -> None:
    """Copy an SQLite log into PostgreSQL (hash chain preserved and verified), in one
    transaction: refused while a server writes the log; interrupted, it leaves the target
    empty and can run again."""
    data_dir = data_dir or settings_for().data_path
    if source is not None and not source.startswith("sqlite:///"):
        source = f"sqlite:///{source}"
    from rich.progress import Progress

    from adapters.postgres.migrate import migrate_store

    path = sqlite_path(source, data_dir)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("copying events", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            report = anyio.run(migrate_store, path, target, progress)
        except StoreLocked as exc:
            fail(f"{exc}. Stop the server first: the events it writes after the copy "
                 "would be lost", 2)
        except (StoreError, ValueError) as exc:
            fail(str(exc), 2)
        except sqlite3.Error as exc:
            fail(f"the log cannot be used: {exc}", 2)
    console.print(f"copied {report.events:,} events, {report.jobs:,} jobs, "
                  f"{report.checkpoints} checkpoints, {report.dead_letters} dead letters and "
                  f"{report.alerts} alerts; the chain verifies (head {report.head_hash[:16]}…)")


@main.command("new-workflow")
@click.argument("name")
@click.option("--workflows-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="Where to create it [default: the workflows_dir setting, ./workflows].")
def new_workflow_command(name: str, workflows_dir: Path | None) -> None:
    """Create a working workflow package NAME (processor, task, config, a test)."""
    from adapters.scaffold import ScaffoldError, new_workflow

    try:
        written = new_workflow(name, workflows_dir or Path(settings_for().workflows_dir))
    except ScaffoldError as exc:
        fail(str(exc), 2)
    root = written[0].parent
    console.print(f"created the workflow [bold]{name}[/] in {root}/:")
    for path in written:
        console.print(f"  {path.relative_to(root)}")
    console.print(f"next: edit {root}/processor.py, run its test with "
                  f"[bold]python -m pytest {root}/tests[/], then [bold]multiflow run[/] and drop "
                  f"a file into data/{name}/input/")


@main.command("config")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A multiflow.toml (default: ./multiflow.toml if present).")
def show_config(config_file: Path | None) -> None:
    """Print the effective settings (toml < .env < environment), secrets masked."""
    from adapters.config import SettingsError, load_settings, masked

    try:
        settings = load_settings(config_file)
    except SettingsError as exc:
        fail(str(exc), 2)
    console.print_json(data=masked(settings))


@main.command()
@click.option("--url", required=True, help="The multiflow server, e.g. http://host:8000.")
@click.option("--workflow", "workflow_name", required=True, help="The workflow to upload to.")
@click.option("--token", envvar="MULTIFLOW_TOKEN", default=None,
              help="API token (or MULTIFLOW_TOKEN).")
@click.option("--settle-ms", type=click.IntRange(0), default=500, show_default=True)
@click.option("--marker", is_flag=True, help="Wait for NAME.done beside each file.")
@click.option("--priority", type=click.IntRange(-100, 100), default=0, show_default=True)
@click.option("--channel", "channel_name", default=None)
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def watch(url: str, workflow_name: str, token: str | None, settle_ms: int, marker: bool,
          priority: int, channel_name: str | None, folder: Path) -> None:
    """Watch FOLDER on this machine and upload each complete file to the server."""
    from adapters.logs import configure_logging
    from adapters.remote import watch_remote

    configure_logging()
    try:
        anyio.run(lambda: watch_remote(url, workflow_name, folder, token, settle_ms=settle_ms,
                                       marker=marker, priority=priority,
                                       channel_name=channel_name))
    except ValueError as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        pass


from adapters import ops_cli as _ops_cli  # noqa: E402, F401  (status, jobs, backup, doctor ...)
from adapters import runner as _runner  # noqa: E402  (registers `multiflow run`)

main.add_command(_runner.run)
