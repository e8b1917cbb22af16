"""The operator's commands, registered on `multiflow`.

`status`, `jobs`, `job`, `submit`, `cancel`, `retry` and `explain` talk to the
running server (--url, MULTIFLOW_URL; the token from --token, MULTIFLOW_TOKEN or
DATA/.api-token). `backup`, `restore`, `vacuum`, `cleanup` and `doctor` work on
the data folder itself (the logic is in adapters.maintenance).
Exit codes: 0 ok, 1 the command found or met a problem, 2 bad usage, settings or
store, 3 no server answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
import click
from rich import box
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table

from adapters import maintenance
from adapters.cli import console, fail, main, settings_for, sqlite_path
from adapters.config import Settings
from adapters.http.security import read_token_file
from adapters.sqlite.lock import WriterLock
from kernel.ports import StoreError, StoreLocked

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_SERVER_DOWN = 3
UPLOAD_CHUNK_BYTES = 256 * 1024
ROWS_SHOWN_MAX = 200


# -- talking to the server ------------------------------------------------------------------


class ServerDown(Exception):
    """No server answers at the URL."""


class ApiFailure(Exception):
    """The server answered with an error; `detail` is its problem document's message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Api:
    """A small JSON client over http.client: one connection per request."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self._parts, self._prefix = parts, parts.path.rstrip("/")

    def call(self, method: str, path: str, *, query: dict[str, Any] | None = None,
             body: Any = None) -> Any:
        """Send a request (a JSON body if given) and decode the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self._send(method, self._target(path, query), iter([data or b""]), headers)

    def upload(self, workflow: str, path: Path, query: dict[str, Any],
               on_bytes: Callable[[int], None]) -> Any:
        """Stream a local file to /api/{workflow}/process; its sha256 is the Idempotency-Key."""
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Length": str(path.stat().st_size),
                   "Idempotency-Key": f"sha256:{_sha256(path)}"}
        target = self._target(f"/api/{workflow}/process", {"filename": path.name, **query})
        return self._send("POST", target, _chunks(path, on_bytes), headers)

    def _target(self, path: str, query: dict[str, Any] | None) -> str:
        pairs = {k: v for k, v in (query or {}).items() if v is not None}
        return self._prefix + path + ("?" + urllib.parse.urlencode(pairs) if pairs else "")

    def _send(self, method: str, target: str, chunks: Iterator[bytes],
              headers: dict[str, str]) -> Any:
        kind = http.client.HTTPSConnection if self._parts.scheme == "https" \
            else http.client.HTTPConnection
        conn = kind(self._parts.hostname or "", self._parts.port, timeout=self.timeout_s)
        try:
            try:
                conn.connect()
            except OSError as exc:  # refused, unknown host, unreachable, timed out
                raise ServerDown(f"{self.url}: {exc}") from None
            # A server that answers early (413) and closes breaks the send: read its answer.
            with contextlib.suppress(OSError):
                self._write(conn, method, target, chunks, headers)
            try:
                response = conn.getresponse()
                status, payload = response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise ApiFailure(0, f"the connection to {self.url} broke: {exc!r}") from None
        finally:
            conn.close()
        return _decode(status, payload)

    def _write(self, conn: http.client.HTTPConnection, method: str, target: str,
               chunks: Iterator[bytes], headers: dict[str, str]) -> None:
        sent = {"Connection": "close", "Accept": "application/json", **headers}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        conn.putrequest(method, target)
        for name, value in sent.items():
            conn.putheader(name, value)
        first = next(chunks)
        if "Content-Length" not in sent:
            conn.putheader("Content-Length", str(len(first)))
        conn.endheaders(first or None)
        for chunk in chunks:
            conn.send(chunk)


def _decode(status: int, payload: bytes) -> Any:
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        data = None
    if status >= 400:
        detail = data.get("detail") if isinstance(data, dict) else None
        raise ApiFailure(status, str(detail or payload[:200].decode(errors="replace")))
    return data


def _chunks(path: Path, on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    yield b""
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK_BYTES):
            on_bytes(len(chunk))
            yield chunk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def die(message: str, code: int = 1) -> NoReturn:
    """Print an error and exit with `code`."""
    fail(message, code)
    raise SystemExit(code)  # fail() exits; this tells the type checker so


def connect(url: str, token: str | None, data_dir: Path | None) -> Api:
    """A client for the server at `url`, with the token from the flag, env or DATA/.api-token."""
    if token is None:
        token = read_token_file(data_dir or settings_for().data_path)
    return Api(url, token)


def ask(api: Api, method: str, path: str, **options: Any) -> Any:
    """Call the server; on failure print a clear message and exit."""
    try:
        return api.call(method, path, **options)
    except ServerDown as exc:
        server_down(api.url, exc)
    except ApiFailure as exc:
        api_failed(exc)


def server_down(url: str, exc: Exception) -> NoReturn:
    """Say that no server answers, and how to start one; exit 3."""
    die(f"no multiflow server answers at {url} ({exc}).\n"
         "  Start it with `multiflow run` (or `systemctl start multiflow`), or point to it "
         "with --url / MULTIFLOW_URL.", EXIT_SERVER_DOWN)


def api_failed(exc: ApiFailure) -> NoReturn:
    """Print the server's refusal (with a hint for a bad token) and exit 1."""
    if exc.status == 401:
        die("the server refused the token: pass --token or set MULTIFLOW_TOKEN (a server "
             "without api_tokens keeps its token in DATA/.api-token)", 2)
    die(exc.detail if exc.status == 0 else f"the server answered {exc.status}: {exc.detail}")


url_option = click.option("--url", envvar="MULTIFLOW_URL", default=DEFAULT_URL,
                          show_default=True, help="The server (or MULTIFLOW_URL).")
token_option = click.option("--token", envvar="MULTIFLOW_TOKEN", default=None,
                            help="API token (or MULTIFLOW_TOKEN; default: DATA/.api-token).")
data_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                           default=None, envvar="MULTIFLOW_DATA_DIR",
                           help="The data root [default: the data_dir setting, ./data].")
store_option = click.option("--store", default=None, envvar="MULTIFLOW_STORE",
                            help="sqlite:///PATH [default: DATA/multiflow.db].")
config_option = click.option("--config", "config_file", default=None,
                             type=click.Path(dir_okay=False, path_type=Path),
                             help="A multiflow.toml (default: ./multiflow.toml if present).")


def server_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command --url, --token and --data-dir (where DATA/.api-token is)."""
    return url_option(token_option(data_option(func)))


def store_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command --config, --data-dir and --store."""
    return config_option(data_option(store_option(func)))


def db_of(config_file: Path | None, data_dir: Path | None, store: str | None
          ) -> tuple[Settings, Path]:
    """The settings and the SQLite file a store command works on."""
    settings = settings_for(config_file, data_dir=str(data_dir) if data_dir else None,
                            store=store)
    try:
        return settings, sqlite_path(settings.store, settings.data_path)
    except click.UsageError as exc:
        die(exc.message, 2)


# -- rendering --------------------------------------------------------------------------------


def when(value: str | None) -> str:
    """An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC), or '-'."""
    return value.replace("T", " ")[:19] if value else "-"


def age(seconds: float | None) -> str:
    """A duration for humans: 42 s, 7 min, 3.5 h, 2.1 d."""
    if seconds is None:
        return "-"
    magnitude = abs(seconds)
    text = f"{magnitude:.0f} s" if magnitude < 120 else f"{magnitude / 60:.0f} min" \
        if magnitude < 7200 else f"{magnitude / 3600:.1f} h" if magnitude < 172800 \
        else f"{magnitude / 86400:.1f} d"
    return text if seconds >= 0 else f"-{text}"


def since(value: str | None) -> float | None:
    """Seconds from an RFC 3339 time to now."""
    if not value:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(value.replace("Z", "+00:00"))) \
        .total_seconds()


def id_column(table: Table, name: str = "job") -> None:
    """A column that never wraps or cuts an id (26 characters)."""
    table.add_column(name, no_wrap=True, min_width=26)


def jobs_table(items: list[dict[str, Any]], width: int = 120) -> Table:
    """Jobs as rows: id, workflow, status, priority, attempts, created, where the file is.

    The file is shown as its folder and name (`multiflow job ID` and `--json` give the
    whole path); below 100 columns the creation time is left out so the rest fits."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    id_column(table)
    table.add_column("workflow", overflow="fold")
    table.add_column("status", no_wrap=True, min_width=9)  # "cancelled"
    table.add_column("prio", no_wrap=True, justify="right")
    table.add_column("tries", no_wrap=True, justify="right")
    wide = width >= 100
    if wide:
        table.add_column("created (UTC)", no_wrap=True)
    table.add_column("file / error", overflow="fold")
    for job in items:
        error = job.get("error") or {}
        note = f"{error.get('type')}: {error.get('message')}" if error else \
            short_path(job["current_path"], job["id"])
        row = [job["id"], job["workflow_name"], job["status"], str(job["priority"]),
               str(job["attempts"])]
        if wide:
            row.append(when(job["created_at"])[5:])
        table.add_row(*row, note)
    return table


def short_path(path: str, job_id: str) -> str:
    """`wf/archive/2026-11-30/ID--report.csv` as `archive/report.csv`."""
    parts = path.split("/")
    if len(parts) < 3:
        return path
    name = parts[-1].removeprefix(f"{job_id}--")
    return f"{parts[1]}/{name}"


# -- commands that talk to the server -----------------------------------------------------


@main.command()
@server_command
def status(url: str, token: str | None, data_dir: Path | None) -> None:
    """The server: readiness checks, queue depth, running jobs, workflows."""
    api = connect(url, token, data_dir)
    health = ask(api, "GET", "/healthz")
    queue = ask(api, "GET", "/api/queue")
    workflows = ask(api, "GET", "/api/workflows")
    running = ask(api, "GET", "/api/jobs", query={"status": "running", "limit": 100})
    colour = "green" if health["status"] == "ready" else "red"
    console.print(f"[bold]{api.url}[/] is [{colour}]{health['status']}[/]")
    checks = Table("check", "ok", "detail")
    for check in health["checks"]:
        checks.add_row(check["name"], "[green]yes[/]" if check["ok"] else "[red]NO[/]",
                       check["detail"])
    console.print(checks)
    console.print(f"queue: {queue['depth']} pending, {queue['running']} running"
                  + ("" if queue["claiming"] else " (draining: no job starts)"))
    buckets = Table("workflow", "priority", "pending")
    for bucket in queue["buckets"]:
        buckets.add_row(bucket["workflow_name"], str(bucket["priority"]), str(bucket["depth"]))
    if queue["buckets"]:
        console.print(buckets)
    if running["items"]:
        console.print(jobs_table(running["items"], console.width))
    console.print(workflows_table(workflows))
    if health["status"] != "ready":
        raise SystemExit(1)


def workflows_table(workflows: list[dict[str, Any]]) -> Table:
    """Each workflow: enabled, concurrency, timeout, attempts, problem."""
    table = Table("workflow", "enabled", "concurrency", "timeout", "attempts", "problem")
    for item in workflows:
        table.add_row(item["name"], "yes" if item["enabled"] else "[yellow]no[/]",
                      str(item["concurrency"] or "-"),
                      f"{item['timeout_s']:g} s" if item["timeout_s"] else "-",
                      str(item["max_attempts"]), item.get("problem") or "")
    return table


@main.command()
@server_command
@click.option("--status", "status_", type=click.Choice(
    ["pending", "running", "completed", "failed", "cancelled"]), default=None)
@click.option("--workflow", default=None)
@click.option("--channel", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="One job per line as the API's JSON, for scripts.")
def jobs(url: str, token: str | None, data_dir: Path | None, status_: str | None,
         workflow: str | None, channel: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    api = connect(url, token, data_dir)
    page = ask(api, "GET", "/api/jobs", query={
        "status": status_, "workflow_name": workflow, "channel_name": channel, "limit": limit})
    if as_json:
        for item in page["items"]:
            click.echo(json.dumps(item, ensure_ascii=False))
        return
    console.print(jobs_table(page["items"], console.width))
    more = " (more: raise --limit)" if page["next_cursor"] else ""
    console.print(f"{len(page['items'])} job(s){more}")


@main.command()
@server_command
@click.argument("job_id")
def job(url: str, token: str | None, data_dir: Path | None, job_id: str) -> None:
    """One job and its events."""
    api = connect(url, token, data_dir)
    found = ask(api, "GET", f"/api/jobs/{_quote(job_id)}")
    events = ask(api, "GET", f"/api/jobs/{_quote(job_id)}/events")
    console.print(job_detail(found))
    table = Table("seq", "v", "event", "at", "data")
    for event in events:
        data = json.dumps(event["data"], separators=(",", ":"), ensure_ascii=False)
        table.add_row(str(event["seq"]), str(event["version"]), event["type"],
                      when(event["at"]), data if len(data) <= 160 else data[:157] + "...")
    console.print(table)


def job_detail(job: dict[str, Any]) -> Table:
    """A job's fields as a two-column table."""
    table = Table("field", "value", show_header=False)
    error = job.get("error") or {}
    rows = [("id", job["id"]), ("workflow", job["workflow_name"]), ("status", job["status"]),
            ("priority", str(job["priority"])), ("channel", job["channel_name"] or "-"),
            ("attempts", str(job["attempts"])), ("progress", f"{job['progress']:.0%}"),
            ("file", job["file_path"]), ("now at", job["current_path"]),
            ("created", when(job["created_at"])), ("started", when(job["started_at"])),
            ("finished", when(job["finished_at"])), ("retry at", when(job["retry_at"])),
            ("error", f"{error.get('type')}: {error.get('message')}" if error else "-"),
            ("outputs", ", ".join(job["output_paths"]) or "-")]
    for field, value in rows:
        table.add_row(field, value)
    return table


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


@main.command()
@server_command
@click.argument("workflow")
@click.argument("file")
@click.option("--priority", type=click.IntRange(-100, 100), default=0, show_default=True)
@click.option("--channel", default=None)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A task parameter (VALUE as JSON, else a string); repeatable.")
@click.option("--upload", is_flag=True, help="Upload FILE even if it looks like a path in input/.")
def submit(url: str, token: str | None, data_dir: Path | None, workflow: str, file: str,
           priority: int, channel: str | None, params: tuple[str, ...], upload: bool) -> None:
    """Make FILE a job of WORKFLOW: a path in its input/, or a local file that is uploaded."""
    api = connect(url, token, data_dir)
    task = dict(_param(p) for p in params)
    inbox = (data_dir or settings_for().data_path) / workflow / "input"
    kind, where = submission(inbox, file, upload)
    if kind == "path":
        found = ask(api, "POST", f"/api/{workflow}/process", body={
            "file_path": where, "priority": priority, "channel_name": channel, **task})
    else:
        found = upload_file(api, workflow, Path(where),
                            {"priority": priority, "channel_name": channel, **task})
    console.print(f"job [bold]{found['id']}[/] ({found['status']}) for {found['file_path']}")


def submission(inbox: Path, file: str, force_upload: bool) -> tuple[str, str]:
    """('path', name inside input/) or ('upload', local path) for a submitted FILE."""
    local = Path(file)
    if force_upload:
        if not local.is_file():
            raise click.BadParameter(f"{file} is not a file here", param_hint="FILE")
        return "upload", str(local)
    if (not local.is_absolute() and (inbox / file).is_file()) or not local.is_file():
        return "path", file  # in input/, or for the server to judge (a remote data folder)
    try:
        return "path", local.resolve().relative_to(inbox.resolve()).as_posix()
    except ValueError:
        return "upload", str(local)


def upload_file(api: Api, workflow: str, path: Path, query: dict[str, Any]) -> Any:
    """Upload with a progress bar; a repeated upload of the same bytes returns its job."""
    columns = (*Progress.get_default_columns()[:2], BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)
        try:
            return api.upload(workflow, path, query, lambda n: progress.advance(task, n))
        except ServerDown as exc:
            server_down(api.url, exc)
        except ApiFailure as exc:
            api_failed(exc)


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--param")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


@main.command()
@server_command
@click.argument("job_id")
@click.option("--reason", default="", help="Recorded in the event.")
def cancel(url: str, token: str | None, data_dir: Path | None, job_id: str, reason: str) -> None:
    """Cancel a pending or running job (the token's name is recorded as the actor)."""
    api = connect(url, token, data_dir)
    found = ask(api, "POST", f"/api/jobs/{_quote(job_id)}/cancel", body={"reason": reason})
    console.print(f"job {found['id']} is {found['status']}")


@main.command()
@server_command
@click.argument("job_id")
@click.option("--reason", default="", help="Recorded in the event.")
def retry(url: str, token: str | None, data_dir: Path | None, job_id: str, reason: str) -> None:
    """Send a failed or cancelled job back to the queue (the token's name is the actor)."""
    api = connect(url, token, data_dir)
    found = ask(api, "POST", f"/api/jobs/{_quote(job_id)}/retry", body={"reason": reason})
    console.print(f"job {found['id']} is {found['status']} again")


@main.command()
@server_command
@click.argument("job_id")
def explain(url: str, token: str | None, data_dir: Path | None, job_id: str) -> None:
    """Why a job is not done: its status, queue place, retry time, file and last event."""
    api = connect(url, token, data_dir)
    found = ask(api, "GET", f"/api/jobs/{_quote(job_id)}/explain")
    job_ = found["job"]
    console.print(f"job [bold]{job_['id']}[/] ({job_['workflow_name']}): {found['summary']}")
    for reason in found["reasons"]:
        console.print(f"  - {reason}")
    if found["queue_position"] is not None:
        console.print(f"queue: number {found['queue_position']} of {found['queue_depth']}; "
                      f"{found['ahead_count']} job(s) start before it")
        ahead = Table("#", "workflow", "priority", "effective")
        id_column(ahead)
        for number, item in enumerate(found["ahead"], 1):
            ahead.add_row(str(number), item["workflow_name"], str(item["priority"]),
                          str(item["effective_priority"]), item["id"])
        if found["ahead"]:
            console.print(ahead)
    if found["retry_in_s"] is not None:
        console.print(f"retry at {when(job_['retry_at'])} UTC (in {age(found['retry_in_s'])})")
    if found["running_for_s"] is not None:
        limit = f" of its {found['timeout_s']:g} s timeout" if found["timeout_s"] else ""
        console.print(f"running for {age(found['running_for_s'])}{limit}")
    explain_file(found["file"])
    last = found["last_event"]
    if last:
        console.print(f"last event: {last['type']} (seq {last['seq']}) at {when(last['at'])} "
                      f"UTC, {age(last['age_s'])} ago")


def explain_file(file: dict[str, Any]) -> None:
    """Where the job's file is, against where it should be."""
    if file["found_at"] == file["expected"]:
        console.print(f"file: {file['expected']} (there)")
    elif file["found_at"]:
        console.print(f"file: [yellow]found at {file['found_at']}[/], expected at "
                      f"{file['expected']} (the server moves it at its next start)")
    else:
        console.print(f"file: [red]missing[/]: not at {file['expected']} nor anywhere the "
                      "lifecycle could have left it")


# -- commands on the data folder ---------------------------------------------------------


@main.command()
@store_command
@click.argument("dest")
def backup(config_file: Path | None, data_dir: Path | None, store: str | None,
           dest: str) -> None:
    """Copy the log to DEST (a file, or a folder for a stamped name) while the server runs;
    a DEST that ends in / must be an existing folder."""
    if dest.endswith(("/", os.sep)) and not Path(dest).is_dir():
        die(f"the folder {dest} does not exist (is the backup disk mounted?)", 2)
    _, db = db_of(config_file, data_dir, store)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("copying the log", total=None)

        def pages(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            report = anyio.run(maintenance.backup, db, Path(dest), pages)
        except (maintenance.MaintenanceError, StoreError) as exc:
            die(str(exc), 2)
    check = report.check
    console.print(f"[green]backup ok[/]: {report.path} ({report.size_bytes:,} bytes): "
                  f"events 1..{report.snapshot_seq:,} (everything committed when it began); "
                  f"integrity_check ok, {check.events:,} events verify on the hash chain; "
                  f"{report.seconds:.1f} s")


@main.command()
@store_command
@click.argument("src", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def restore(config_file: Path | None, data_dir: Path | None, store: str | None, src: Path,
            yes: bool) -> None:
    """Replace the log with the backup SRC (verified first); the server must be stopped."""
    _, db = db_of(config_file, data_dir, store)
    if WriterLock(db).is_held_elsewhere():
        refuse_locked(db, "restore replaces the file under it")
    if not yes:
        click.confirm(f"replace {db} with {src}?", abort=True)
    try:
        report = anyio.run(maintenance.restore, src, db)
    except StoreLocked:
        refuse_locked(db, "restore replaces the file under it")
    except (maintenance.MaintenanceError, StoreError) as exc:
        die(str(exc), 2)
    console.print(f"[green]restored[/] {db} from {src}: events 1..{report.check.last_seq:,}, "
                  "verified")
    for kept in report.kept:
        console.print(f"  kept the replaced file as {kept}")
    console.print("start the server: it reconciles the folders with the restored log "
                  "(jobs made after the backup are not in it)")


def refuse_locked(db: Path, why: str) -> NoReturn:
    """Exit 2: a server holds the store."""
    die(f"a multiflow server (or another writer) holds {db}: {why}. Stop it first "
         "(systemctl stop multiflow, or Ctrl-C on `multiflow run`); `multiflow backup` "
         "works while it runs.", 2)


@main.command()
@store_command
@click.option("--online", is_flag=True,
              help="Only fold the WAL into the log and truncate it (safe while the server runs).")
def vacuum(config_file: Path | None, data_dir: Path | None, store: str | None,
           online: bool) -> None:
    """Rewrite the log compactly (VACUUM); refused while the server runs unless --online."""
    _, db = db_of(config_file, data_dir, store)
    try:
        if online:
            report = maintenance.checkpoint(db)
        elif WriterLock(db).is_held_elsewhere():
            refuse_locked(db, "VACUUM rewrites the whole file and needs it alone; "
                          "`multiflow vacuum --online` only checkpoints the WAL")
        else:
            report = maintenance.vacuum(db)
    except StoreLocked:
        refuse_locked(db, "VACUUM needs the file alone")
    except (maintenance.MaintenanceError, StoreError) as exc:
        die(str(exc), 2)
    console.print(f"{report.mode}: {report.before_bytes:,} -> {report.after_bytes:,} bytes "
                  f"(log and WAL). {report.detail}".rstrip())


@main.command()
@store_command
@click.option("--archive-older-than", "older_than", default=None, metavar="AGE",
              help="30d, 12h, 2w ... [default: the archive_retention_days setting].")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--include-output", is_flag=True,
              help="Also remove files in output/ older than AGE (by modification time).")
def cleanup(config_file: Path | None, data_dir: Path | None, store: str | None,
            older_than: str | None, dry_run: bool, include_output: bool) -> None:
    """Remove archive/{yyyy-mm-dd}/ folders and archive/duplicates files older than AGE."""
    settings, _ = db_of(config_file, data_dir, store)
    if older_than is None and settings.archive_retention_days <= 0:
        die("archive_retention_days is 0 (keep for ever): pass --archive-older-than", 2)
    try:
        age_ = maintenance.parse_age(older_than or f"{settings.archive_retention_days}d")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--archive-older-than") from None
    report = maintenance.cleanup(settings.data_path, age_, datetime.now(UTC), dry_run=dry_run,
                                 include_output=include_output)
    table = Table("path", "kind", "dated (UTC)", "bytes")
    for removal in report.removals[:ROWS_SHOWN_MAX]:
        table.add_row(removal.path, removal.kind, f"{removal.dated:%Y-%m-%d %H:%M}",
                      f"{removal.size_bytes:,}")
    if report.removals:
        console.print(table)
    hidden = len(report.removals) - ROWS_SHOWN_MAX
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.removals)} item(s), {report.size_bytes:,} bytes, "
                  f"dated before {report.cutoff:%Y-%m-%d %H:%M} UTC"
                  + (f" ({hidden} not listed)" if hidden > 0 else ""))


@main.command()
@store_command
@url_option
@token_option
def doctor(config_file: Path | None, data_dir: Path | None, store: str | None, url: str,
           token: str | None) -> None:
    """Check folders, disk, the log, the server's health, stuck jobs, strays; exit 1 if bad."""
    settings, db = db_of(config_file, data_dir, store)
    api = Api(url, token or read_token_file(settings.data_path), timeout_s=10.0)
    server, notes = server_facts(api)
    with console.status("checking the log and the folders"):
        findings = anyio.run(maintenance.diagnose, settings, db, server, datetime.now(UTC), url)
    findings += notes
    table = Table("", "check", "finding", "fix")
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for finding in findings:
        table.add_row(marks[finding.level], finding.check, finding.detail, finding.fix)
    console.print(table)
    failed = sum(1 for f in findings if f.level == "fail")
    warned = sum(1 for f in findings if f.level == "warn")
    console.print(f"{failed} problem(s), {warned} warning(s)")
    if failed:
        raise SystemExit(1)


def server_facts(api: Api) -> tuple[maintenance.ServerFacts | None, list[maintenance.Finding]]:
    """/healthz and the workflows' timeouts from the server, or None when none answers."""
    try:
        health = api.call("GET", "/healthz")
    except (ServerDown, ApiFailure):
        return None, []
    try:
        workflows = api.call("GET", "/api/workflows")
    except (ServerDown, ApiFailure) as exc:
        note = maintenance.Finding(check="server:workflows", level="warn",
                                   detail=f"could not list the workflows: {exc}",
                                   fix="pass --token or set MULTIFLOW_TOKEN")
        return maintenance.ServerFacts(url=api.url, health=health, timeouts_s={}), [note]
    timeouts = {w["name"]: w["timeout_s"] for w in workflows}
    return maintenance.ServerFacts(url=api.url, health=health, timeouts_s=timeouts), []
