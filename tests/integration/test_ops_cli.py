"""The operator's CLI on a real data folder, and against a real `multiflow run` subprocess.

Commands that talk to the server run against one server process for the module
(watchers off, three tiny workflows in a temp MULTIFLOW_WORKFLOWS_DIR); commands on
the data folder run through click's CliRunner on folders and SQLite files of their own.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from adapters import Kernel
from adapters.cli import main
from adapters.config import Settings
from adapters.maintenance import check_log, cleanup_daily
from adapters.ops_cli import Api
from adapters.sqlite import SqliteEventStore
from kernel.events import JobCompleted, JobCreated, JobStarted
from kernel.layout import STAGES
from kernel.ports import Append

JOB_ID = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")
START_TIMEOUT_S = 30.0
WAIT_S = 15.0

WORKFLOWS = {
    "echo": """
        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor


        class Echo(BaseProcessor):
            def process(self, ctx, task):
                return {"size": ctx.input_path.stat().st_size}


        processor = Echo()
        config = WorkflowConfig(max_attempts=1)
    """,
    "parked": """
        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor


        class Parked(BaseProcessor):
            def process(self, ctx, task):
                return {}


        processor = Parked()
        config = WorkflowConfig(enabled=False)
    """,
    "slow": """
        import time

        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor


        class Slow(BaseProcessor):
            def process(self, ctx, task):
                deadline = time.monotonic() + 30
                while not ctx.cancelled and time.monotonic() < deadline:
                    time.sleep(0.02)
                return {}


        processor = Slow()
        config = WorkflowConfig(max_attempts=1)
    """,
    "flaky": """
        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor, JobError


        class Flaky(BaseProcessor):
            def process(self, ctx, task):
                raise JobError("Flaky", "the far end is down", retryable=True)


        processor = Flaky()
        config = WorkflowConfig(max_attempts=3, backoff_base_s=300, backoff_jitter=0)
    """,
}


# -- helpers ------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str]:
    """Run `multiflow ARGS` in-process; its exit code and everything it printed."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MULTIFLOW_")}
    clean.update({"COLUMNS": "250", **(env or {})})
    result = CliRunner().invoke(main, list(args), env=clean, catch_exceptions=False)
    return result.exit_code, result.output


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running `multiflow run` subprocess."""

    url: str
    token: str
    data: Path
    proc: subprocess.Popen[bytes]

    def args(self) -> list[str]:
        """The flags that point a server command at this server."""
        return ["--url", self.url, "--token", self.token, "--data-dir", str(self.data)]

    def api(self) -> Api:
        return Api(self.url, self.token)

    def place(self, workflow: str, name: str, data: bytes = b"hello\n") -> str:
        (self.data / workflow / "input" / name).write_bytes(data)
        return name

    def wait_job(self, job_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll a job until `done(job)`."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.api().call("GET", f"/api/jobs/{job_id}")
            if done(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never got there: {job}")


def start_server(root: Path) -> Server:
    """Write the workflows, start `multiflow run` on a free port, wait for /readyz."""
    for name, source in WORKFLOWS.items():
        (root / "flows" / name).mkdir(parents=True)
        (root / "flows" / name / "__init__.py").write_text(textwrap.dedent(source).lstrip())
    token, port = secrets.token_urlsafe(16), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFLOW_")}
    env.update({"MULTIFLOW_API_TOKENS": f"ci:{token}", "MULTIFLOW_WATCHERS": "false",
                "MULTIFLOW_WORKFLOWS_DIR": str(root / "flows"),
                "MULTIFLOW_DATA_DIR": str(root / "data"), "MULTIFLOW_LOG_FORMAT": "json"})
    with (root / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from adapters.cli import main; main()", "run",
             "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    server = Server(f"http://127.0.0.1:{port}", token, root / "data", proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as answer:
            if answer.status == 200:
                return server
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the server was not ready:\n" + (root / "server.log").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("ops"))
    yield running
    running.proc.send_signal(signal.SIGTERM)
    try:
        running.proc.wait(20)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        running.proc.wait()


def job_id_in(output: str) -> str:
    found = JOB_ID.search(output)
    assert found, output
    return found.group(0)


def submit(server: Server, workflow: str, name: str, *flags: str) -> str:
    """`multiflow submit` a file placed in the workflow's input/; the new job's id."""
    server.place(workflow, name)
    code, out = cli("submit", *server.args(), workflow, name, *flags)
    assert code == 0, out
    return job_id_in(out)


def fill(path: Path, jobs: int, at: datetime | None = None) -> None:
    """A log of `jobs` completed jobs of the workflow `wf` (three events each)."""

    async def write() -> None:
        store = await SqliteEventStore.open(path)
        try:
            when = at or datetime.now(UTC)
            for start in range(0, jobs, 500):
                ids = [f"J{i:08d}" for i in range(start, min(jobs, start + 500))]
                await store.append_batch([Append(i, [
                    JobCreated(job_id=i, at=when, workflow_name="wf",
                               file_path=f"wf/input/{i}.txt"),
                    JobStarted(job_id=i, at=when, attempt=1),
                    JobCompleted(job_id=i, at=when, attempt=1)], 0) for i in ids])
        finally:
            await store.close()

    anyio.run(write)


def data_folder(root: Path, jobs: int = 3) -> Path:
    """A healthy data folder: the workflow `wf`'s five folders and a log of finished jobs."""
    data = root / "data"
    for stage in STAGES:
        (data / "wf" / stage).mkdir(parents=True)
    fill(data / "multiflow.db", jobs)
    return data


# -- commands that talk to the server -----------------------------------------------------


def test_status_shows_readiness_the_queue_and_the_workflows(server: Server) -> None:
    """`status` prints the server's readiness checks, queue depth and every workflow."""
    code, out = cli("status", *server.args())
    assert code == 0, out
    assert "is ready" in out and "queue:" in out
    for name in ("store", "disk", "echo", "parked", "flaky", "slow"):
        assert name in out


def test_submit_by_path_then_jobs_and_job_show_it(server: Server) -> None:
    """A file in input/ submitted by name completes; `jobs` lists it, `job` shows its events."""
    job_id = submit(server, "echo", "by-path.txt", "--priority", "5", "--channel", "ops")
    done = server.wait_job(job_id, lambda j: j["status"] == "completed")
    assert done["priority"] == 5 and done["channel_name"] == "ops"
    code, out = cli("jobs", *server.args(), "--workflow", "echo", "--status", "completed")
    assert code == 0 and job_id in out, out
    code, out = cli("job", *server.args(), job_id)
    assert code == 0, out
    assert "job.created" in out and "job.started" in out and "job.completed" in out
    # An 80-column terminal cuts nothing short: the status and workflow are whole.
    code, out = cli("jobs", *server.args(), "--workflow", "echo", env={"COLUMNS": "80"})
    row = next(line for line in out.splitlines() if job_id in line)
    assert "echo" in row.split() and "completed" in row.split(), out
    assert "archive/by-path.txt" in out.replace("\n", "").replace(" ", ""), out
    code, out = cli("jobs", *server.args(), "--workflow", "echo", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [j["id"] for j in listed] == [job_id], out
    assert listed[0]["current_path"].startswith("echo/archive/")


def test_submit_uploads_a_file_from_outside_input(server: Server, tmp_path: Path) -> None:
    """A local file outside the workflow's input/ is uploaded and becomes a job that runs."""
    local = tmp_path / "outside.txt"
    local.write_bytes(b"x" * 300_000)
    code, out = cli("submit", *server.args(), "echo", str(local))
    assert code == 0, out
    done = server.wait_job(job_id_in(out), lambda j: j["status"] == "completed")
    assert done["file_path"] == "echo/input/outside.txt"
    assert done["result"] == {"size": 300_000}


def test_explain_names_the_queue_place_and_what_starts_before(server: Server) -> None:
    """With the one slot busy, `explain` gives a job's place, the ids before it, its file."""
    blocker = submit(server, "slow", "blocker.txt")
    server.wait_job(blocker, lambda j: j["status"] == "running")
    first = submit(server, "echo", "first.txt", "--priority", "7")
    second = submit(server, "echo", "second.txt")
    try:
        code, out = cli("explain", *server.args(), second)
    finally:
        cli("cancel", *server.args(), blocker)
    assert code == 0, out
    assert "pending" in out and "every slot is busy: 1 of 1 running" in out
    assert "number 2 of" in out and "1 job(s) start before it" in out and first in out
    assert "echo/input/second.txt (there)" in out
    assert "last event: job.created" in out
    server.wait_job(second, lambda j: j["status"] == "completed")


def test_explain_gives_the_retry_time_of_a_job_waiting_to_retry(server: Server) -> None:
    """A job whose attempt failed shows its error and when it runs again."""
    job_id = submit(server, "flaky", "flaky.txt")
    server.wait_job(job_id, lambda j: j["retry_at"] is not None)
    code, out = cli("explain", *server.args(), job_id)
    assert code == 0, out
    assert "Flaky: the far end is down" in out and "retry at" in out
    assert "last event: job.failed" in out
    assert f"flaky/processing/{job_id}--flaky.txt (there)" in out


def test_cancel_and_retry_record_the_tokens_name(server: Server) -> None:
    """`cancel` then `retry` change the job, and its events name the token `ci` as actor."""
    job_id = submit(server, "parked", "to-cancel.txt")
    code, out = cli("explain", *server.args(), job_id)
    assert code == 0 and "the workflow parked is disabled" in out, out
    code, out = cli("cancel", *server.args(), job_id, "--reason", "wrong file")
    assert code == 0 and "cancelled" in out, out
    code, out = cli("retry", *server.args(), job_id)
    assert code == 0 and "pending" in out, out
    events = server.api().call("GET", f"/api/jobs/{job_id}/events")
    actors = {e["type"]: e["data"].get("actor") for e in events}
    assert actors["job.cancelled"] == "ci" and actors["job.retried"] == "ci"
    code, out = cli("cancel", *server.args(), "NOSUCHJOB")
    assert code == 1 and "404" in out


def test_a_refused_connection_says_that_the_server_is_not_running() -> None:
    """With nothing listening, the command says so and how to start the server (exit 3)."""
    code, out = cli("status", "--url", f"http://127.0.0.1:{free_port()}", "--token", "t")
    assert code == 3
    assert "no multiflow server answers" in out and "multiflow run" in out


def test_a_wrong_token_gets_a_clear_message(server: Server) -> None:
    """A refused token is named as such, with where the right one comes from."""
    code, out = cli("jobs", "--url", server.url, "--token", "wrong")
    assert code == 2 and "refused the token" in out


def test_backup_runs_beside_the_server_and_restore_is_refused(server: Server,
                                                              tmp_path: Path) -> None:
    """Backup works while the server runs; restore and VACUUM are refused with why."""
    db = server.data / "multiflow.db"
    code, out = cli("backup", "--data-dir", str(server.data), str(tmp_path))
    assert code == 0 and "backup ok" in out, out
    (copy,) = tmp_path.glob("multiflow-*.db")
    before = db.stat().st_mtime_ns
    code, out = cli("restore", "--data-dir", str(server.data), "--yes", str(copy))
    assert code == 2 and "holds" in out and "Stop it first" in out, out
    assert db.stat().st_mtime_ns == before
    code, out = cli("vacuum", "--data-dir", str(server.data))
    assert code == 2 and "--online" in out, out
    code, out = cli("vacuum", "--data-dir", str(server.data), "--online")
    assert code == 0 and "checkpoint" in out, out


def test_doctor_finds_a_running_server_healthy(server: Server) -> None:
    """Against the live server and its data folder, every check passes (exit 0)."""
    code, out = cli("doctor", "--data-dir", str(server.data), "--url", server.url,
                    "--token", server.token, env={"MULTIFLOW_WORKFLOWS_DIR": "/nonexistent"})
    assert code == 0, out
    assert "is ready" in out and "the chain holds" in out and "folders:echo" in out


# -- backup, restore, vacuum --------------------------------------------------------------


def test_backup_while_a_writer_appends_holds_every_event_committed_before(
        tmp_path: Path) -> None:
    """A backup taken under a steady stream of appends opens, verifies and holds them all."""
    db = tmp_path / "data" / "multiflow.db"
    fill(db, 2000)
    committed = [0]
    stop = threading.Event()
    started = threading.Event()

    async def append_forever() -> None:
        store = await SqliteEventStore.open(db)  # holds the writer's lock, as a server does
        try:
            n = 0
            while not stop.is_set():
                job_id = f"W{n:08d}"
                stored = await store.append(job_id, [JobCreated(
                    job_id=job_id, at=datetime.now(UTC), workflow_name="wf",
                    file_path=f"wf/input/{job_id}")], 0)
                committed[0] = stored[-1].seq
                started.set()
                n += 1
        finally:
            await store.close()

    writer = threading.Thread(target=anyio.run, args=(append_forever,))
    writer.start()
    try:
        assert started.wait(10)
        time.sleep(0.05)
        before = committed[0]
        code, out = cli("backup", "--data-dir", str(tmp_path / "data"),
                        str(tmp_path / "copy.db"))
        during = committed[0]
    finally:
        stop.set()
        writer.join(10)
    assert code == 0, out
    assert during > before, "the writer did not append while the backup ran"
    check = anyio.run(check_log, tmp_path / "copy.db")
    assert check.ok and check.integrity == "ok"
    assert check.last_seq >= before and check.events == check.last_seq
    copy = sqlite3.connect(tmp_path / "copy.db")
    live = sqlite3.connect(db)
    try:
        query = "SELECT seq, hash FROM events WHERE seq <= ? ORDER BY seq"
        assert copy.execute(query, (before,)).fetchall() == live.execute(query, (before,)) \
            .fetchall()
    finally:
        copy.close()
        live.close()


def test_restore_puts_a_verified_backup_back_and_keeps_the_replaced_log(tmp_path: Path) -> None:
    """Restore replaces the log with the backup and keeps the old one beside it."""
    data = data_folder(tmp_path, jobs=5)
    code, out = cli("backup", "--data-dir", str(data), str(tmp_path / "b.db"))
    assert code == 0, out
    fill(data / "multiflow.db", 8)  # J00000005.. are new; the first five exist: refused
    code, out = cli("restore", "--data-dir", str(data), "--yes", str(tmp_path / "b.db"))
    assert code == 0, out
    assert anyio.run(check_log, data / "multiflow.db").last_seq == 15
    (kept,) = data.glob("multiflow.db.before-restore-*")
    assert anyio.run(check_log, kept).last_seq == 24
    code, out = cli("audit", "verify", "--data-dir", str(data))
    assert code == 0, out


CRASHING_RESTORE = """
import os, sys
from pathlib import Path
import anyio
from adapters import maintenance

point = sys.argv[3]
real_link, real_replace = os.link, os.replace

def link(src, dst, **kw):
    real_link(src, dst, **kw)
    if point == "after the old log is kept":
        os._exit(9)

def replace(src, dst):
    if point == "before the swap":
        os._exit(9)
    real_replace(src, dst)
    if point == "after the swap":
        os._exit(9)

os.link, os.replace = link, replace
anyio.run(maintenance.restore, Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.parametrize("point", ["after the old log is kept", "before the swap",
                                   "after the swap"])
def test_a_crash_during_restore_leaves_the_old_log_or_the_new_one(tmp_path: Path,
                                                                  point: str) -> None:
    """A power cut at any step of a restore leaves multiflow.db as the old log or as the
    backup, whole (the old log was renamed away first: a crash then left none, and the
    next start began an empty log)."""
    data = data_folder(tmp_path, jobs=5)  # 15 events
    code, out = cli("backup", "--data-dir", str(data), str(tmp_path / "b.db"))
    assert code == 0, out
    fill(data / "multiflow.db", 8)  # 24 events now, some in the WAL
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_RESTORE, str(tmp_path / "b.db"),
         str(data / "multiflow.db"), point],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        cwd=tmp_path, capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr
    check = anyio.run(check_log, data / "multiflow.db")
    assert check.ok and check.last_seq == (15 if point == "after the swap" else 24)


def test_rebuild_of_a_missing_log_is_refused_instead_of_making_an_empty_one(
        tmp_path: Path) -> None:
    """A mistyped --data-dir is an error (rebuild made a new, empty log and said it had
    rebuilt 0 jobs)."""
    wrong = tmp_path / "datta"
    code, out = cli("rebuild", "--data-dir", str(wrong))
    assert code == 2 and "no event log" in out, out
    assert not (wrong / "multiflow.db").exists()


@pytest.mark.parametrize("args", [["vacuum"], ["vacuum", "--online"], ["rebuild"]])
def test_commands_on_a_damaged_log_say_so_instead_of_a_traceback(tmp_path: Path,
                                                                  args: list[str]) -> None:
    """A file that is not an SQLite log: a clear error naming it and exit code 2."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "multiflow.db").write_bytes(b"this is not an SQLite file\n" * 200)
    result = CliRunner().invoke(main, [*args, "--data-dir", str(data)],
                                env={"COLUMNS": "250"})
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert result.exit_code == 2 and "error:" in result.output, result.output


@pytest.mark.parametrize("age", ["1000000d", "99999999999d"])
def test_cleanup_with_an_age_past_any_date_is_not_a_traceback(tmp_path: Path,
                                                              age: str) -> None:
    """An age further back than dates go: nothing is that old, or a usage error."""
    data = data_folder(tmp_path, jobs=1)
    result = CliRunner().invoke(main, ["cleanup", "--data-dir", str(data),
                                       "--archive-older-than", age], env={"COLUMNS": "250"})
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    assert result.exit_code in (0, 2), result.output


def test_backup_into_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    """`multiflow backup /srv/backups/multiflow/` with the folder missing (a first night,
    an unmounted disk) is refused, not written as a file named like the folder."""
    data = data_folder(tmp_path, jobs=2)
    dest = tmp_path / "backups"
    code, out = cli("backup", "--data-dir", str(data), f"{dest}/")
    assert code == 2 and "does not exist" in out, out
    assert not dest.exists()


def test_restore_refuses_a_backup_that_does_not_verify(tmp_path: Path) -> None:
    """A backup with an edited event is refused and the live log is left alone."""
    data = data_folder(tmp_path)
    bad = tmp_path / "bad.db"
    code, _ = cli("backup", "--data-dir", str(data), str(bad))
    conn = sqlite3.connect(bad)
    conn.execute("UPDATE events SET payload = replace(payload, 'wf/', 'xx/') WHERE seq = 1")
    conn.commit()
    conn.close()
    code, out = cli("restore", "--data-dir", str(data), "--yes", str(bad))
    assert code == 2 and "does not verify" in out and "seq 1" in out, out
    assert not list(data.glob("multiflow.db.before-restore-*"))


def test_vacuum_rewrites_a_log_that_no_server_holds(tmp_path: Path) -> None:
    """Offline, VACUUM runs and the log still verifies."""
    data = data_folder(tmp_path, jobs=200)
    code, out = cli("vacuum", "--data-dir", str(data))
    assert code == 0 and out.startswith("vacuum:"), out
    assert anyio.run(check_log, data / "multiflow.db").ok


# -- cleanup ------------------------------------------------------------------------------


def aged(path: Path, days: float, data: bytes = b"x") -> Path:
    """Write a file and date its modification time `days` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = time.time() - days * 86400
    os.utime(path, (stamp, stamp))
    return path


def archive_fixture(data: Path) -> dict[str, Path]:
    """Old and recent archive days and duplicates, and old files in the other folders."""
    now = datetime.now(UTC)
    old_day, new_day = f"{now - timedelta(days=40):%Y-%m-%d}", f"{now - timedelta(days=1):%Y-%m-%d}"
    old_stamp = f"{now - timedelta(days=45):%Y%m%dT%H%M%S%f}"
    new_stamp = f"{now - timedelta(days=2):%Y%m%dT%H%M%S%f}"
    wf = data / "wf"
    return {
        "old_day": aged(wf / "archive" / old_day / "J1--a.txt", 40).parent,
        "new_day": aged(wf / "archive" / new_day / "J2--b.txt", 1).parent,
        "old_dup": aged(wf / "archive" / "duplicates" / f"J3--{old_stamp}--c.txt", 1),
        "new_dup": aged(wf / "archive" / "duplicates" / f"J4--{new_stamp}--d.txt", 50),
        **{stage: aged(wf / stage / "old.txt", 90) for stage in
           ("input", "processing", "output", "error")},
    }


def test_cleanup_removes_only_old_archive_days_and_duplicates(tmp_path: Path) -> None:
    """A dry run lists and keeps; the run removes old archive days and duplicates only."""
    data = tmp_path / "data"
    paths = archive_fixture(data)
    code, out = cli("cleanup", "--data-dir", str(data), "--archive-older-than", "30d",
                    "--dry-run")
    assert code == 0 and "would remove 2 item(s)" in out, out
    assert all(path.exists() for path in paths.values())
    code, out = cli("cleanup", "--data-dir", str(data), "--archive-older-than", "30d")
    assert code == 0 and "removed 2 item(s)" in out, out
    gone = {name for name, path in paths.items() if not path.exists()}
    assert gone == {"old_day", "old_dup"}
    code, out = cli("cleanup", "--data-dir", str(data), "--archive-older-than", "30d",
                    "--include-output")
    assert code == 0 and not paths["output"].exists() and paths["input"].exists(), out
    code, out = cli("cleanup", "--data-dir", str(data), "--archive-older-than", "soon")
    assert code == 2 and "not an age" in out


@pytest.mark.anyio
async def test_cleanup_daily_removes_old_archive_days_in_a_running_kernel(
        tmp_path: Path) -> None:
    """The server's daily task removes what is past archive_retention_days, then sleeps."""
    data = tmp_path / "data"
    paths = archive_fixture(data)
    settings = Settings(data_dir=str(data), archive_retention_days=30)
    async with Kernel.open(store="memory://", data_dir=data) as kernel, \
            anyio.create_task_group() as tg:
        await tg.start(cleanup_daily, kernel, settings)
        with anyio.fail_after(WAIT_S):
            while paths["old_day"].exists() or paths["old_dup"].exists():  # noqa: ASYNC110
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert paths["new_day"].exists() and paths["output"].exists()


# -- doctor -------------------------------------------------------------------------------


def doctor(data: Path, *, url: str | None = None) -> tuple[int, str]:
    """`multiflow doctor` on a data folder, with no server (or a given URL)."""
    return cli("doctor", "--data-dir", str(data), "--url",
               url or f"http://127.0.0.1:{free_port()}", "--token", "t",
               env={"MULTIFLOW_WORKFLOWS_DIR": str(data.parent / "no-workflows")})


def plant_missing_folder(data: Path) -> str:
    (data / "wf" / "error").rmdir()
    return "wf/error is missing"


def plant_file_for_folder(data: Path) -> str:
    (data / "wf" / "output").rmdir()
    (data / "wf" / "output").write_text("not a folder")
    return "wf/output is a file, not a folder"


def plant_tampered_event(data: Path) -> str:
    conn = sqlite3.connect(data / "multiflow.db")
    conn.execute("UPDATE events SET payload = replace(payload, 'wf/', 'xx/') WHERE seq = 4")
    conn.commit()
    conn.close()
    return "the hash chain breaks at seq 4"


def plant_stray_file(data: Path) -> str:
    (data / "wf" / "processing" / "NOBODY--lost.txt").write_text("?")
    return "wf/processing/NOBODY--lost.txt: no job owns it"


def plant_job_past_its_timeout(data: Path) -> str:
    async def append() -> None:
        store = await SqliteEventStore.open(data / "multiflow.db")
        at = datetime.now(UTC) - timedelta(hours=2)
        try:
            await store.append("STUCK", [
                JobCreated(job_id="STUCK", at=at, workflow_name="wf", file_path="wf/input/s"),
                JobStarted(job_id="STUCK", at=at, attempt=1)], 0)
        finally:
            await store.close()

    anyio.run(append)
    (data / "wf" / "processing" / "STUCK--s").write_text("s")
    return "past its timeout of 3600 s, but no server runs"


@pytest.mark.parametrize("plant", [plant_missing_folder, plant_file_for_folder,
                                   plant_tampered_event, plant_stray_file,
                                   plant_job_past_its_timeout])
def test_doctor_finds_each_planted_problem(tmp_path: Path,
                                           plant: Callable[[Path], str]) -> None:
    """A healthy folder passes; after one planted problem doctor names it and exits 1."""
    data = data_folder(tmp_path)
    code, out = doctor(data)
    assert code == 0, out
    assert "no server answers" in out  # a warning, not a failure
    expected = plant(data)
    code, out = doctor(data)
    assert code == 1, out
    assert expected in out, out
    assert "1 problem(s)" in out, out


class FakeServer(http.server.BaseHTTPRequestHandler):
    """Answers /healthz with a watcher whose heartbeat is stale, and /api/workflows."""

    answers: dict[str, Any] = {
        "/healthz": {"status": "not ready", "checks": [
            {"name": "store", "ok": True, "detail": ""},
            {"name": "watcher:wf", "ok": False, "detail": "heartbeat 301 s ago"}]},
        "/api/workflows": [{"name": "wf", "timeout_s": 60.0}],
    }

    def do_GET(self) -> None:
        body = json.dumps(self.answers[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_doctor_reports_a_stale_watcher_heartbeat_from_the_server(tmp_path: Path) -> None:
    """A watcher the server reports stale is a failure with the watcher's fix."""
    data = data_folder(tmp_path)
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=fake.serve_forever, args=(0.05,))
    thread.start()
    try:
        code, out = doctor(data, url=f"http://127.0.0.1:{fake.server_address[1]}")
    finally:
        fake.shutdown()
        fake.server_close()
        thread.join()
    assert code == 1, out
    assert "watcher:wf" in out and "heartbeat 301 s ago" in out
    assert "max_user_watches" in out
