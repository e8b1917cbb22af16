"""The real `multiflow run` as a subprocess on a free loopback port, with test workflows.

`launch(root, **settings)` writes the workflow packages below into `root/workflows`,
starts the server with `MULTIFLOW_*` settings, waits for /livez and returns a `Server`
handle: its URL and token, its data dir, its event count (read from the SQLite file),
and a way to stop it with a signal.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
BIND_ATTEMPTS = 3

WORKFLOWS: dict[str, str] = {
    # A typed task: `times` must be an int within 1..10, `word` a short string.
    "echo": '''
        from typing import Annotated

        import msgspec

        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor, BaseTask, JobError


        class EchoTask(BaseTask):
            word: Annotated[str, msgspec.Meta(max_length=100)] = "hi"
            times: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1


        class Echo(BaseProcessor):
            Task = EchoTask

            def process(self, ctx, task):
                if task.word == "boom":
                    raise JobError("Boom", "asked to fail", retryable=False)
                size = ctx.input_path.stat().st_size
                return {"echo": task.word * task.times, "size": size}


        processor = Echo()
        config = WorkflowConfig(max_attempts=1, settle_ms=100)
    ''',
    # Sleeps in its worker thread, checking for a cancel or shutdown every 20 ms.
    "slow": '''
        import time

        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor, BaseTask


        class SlowTask(BaseTask):
            seconds: float = 1.0


        class Slow(BaseProcessor):
            Task = SlowTask

            def process(self, ctx, task):
                deadline = time.monotonic() + task.seconds
                while time.monotonic() < deadline:
                    ctx.check_cancelled()
                    time.sleep(0.02)
                return {"slept_s": task.seconds}


        processor = Slow()
        config = WorkflowConfig(max_attempts=1, timeout_s=120)
    ''',
    # Disabled: its jobs stay pending for ever, which makes "active" deterministic.
    "parked": '''
        from kernel.config import WorkflowConfig
        from kernel.task import BaseProcessor, BaseTask


        class ParkedTask(BaseTask):
            note: str = ""


        class Parked(BaseProcessor):
            Task = ParkedTask

            def process(self, ctx, task):
                return {}


        processor = Parked()
        config = WorkflowConfig(enabled=False)
    ''',
}


def free_port() -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_workflows(folder: Path) -> None:
    """Write the test workflow packages into `folder` (the server's workflows_dir)."""
    for name, source in WORKFLOWS.items():
        package = folder / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(textwrap.dedent(source).lstrip())


def multiflow_command() -> list[str]:
    """The `multiflow` console script of this interpreter, or its entry point."""
    script = Path(sys.executable).parent / "multiflow"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from adapters.cli import main; main()"]


@dataclass
class Server:
    """A running `multiflow run` and what a test needs to talk to it."""

    url: str
    token: str
    root: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "multiflow.db"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def input_dir(self, workflow_name: str) -> Path:
        return self.data_dir / workflow_name / "input"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, *, keepalive: bool = False, **options: Any) -> httpx2.Client:
        """An authenticated client on the server's base URL.

        One connection per request unless `keepalive`: the server closes the connection
        after every problem response (see test_errors_keep_the_connection_alive), which
        would make a reused connection fail at random.
        """
        return self.anonymous(keepalive=keepalive, headers=self.headers(), **options)

    def anonymous(self, *, keepalive: bool = False, **options: Any) -> httpx2.Client:
        """A client that sends no token (one connection per request unless `keepalive`)."""
        options.setdefault("timeout", 15.0)
        options.setdefault("verify", False)  # plain http on loopback: skip the costly TLS setup
        headers = dict(options.pop("headers", {}))
        if not keepalive:
            headers["Connection"] = "close"
        return httpx2.Client(base_url=self.url, headers=headers, **options)

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        """Rows of a query on the server's SQLite file, opened read-only."""
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return list(conn.execute(query).fetchall())
        finally:
            conn.close()

    def event_count(self) -> int:
        """Rows in the event log."""
        return int(self.sql("SELECT count(*) FROM events")[0][0])

    def wait_quiet(self, timeout_s: float = 20.0) -> int:
        """Wait until no job that can run is active and the log is still; its length then."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            before = self.event_count()
            active = self.sql("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')"
                              " AND workflow_name != 'parked'")[0][0]
            time.sleep(0.05)
            if active == 0 and self.event_count() == before:
                return before
        raise AssertionError("the server did not become quiet")

    def staged_files(self) -> list[Path]:
        """Files left in data/.staging (where uploads are streamed first)."""
        staging = self.data_dir / ".staging"
        return sorted(staging.iterdir()) if staging.is_dir() else []

    def wait_job(self, job_id: str, statuses: tuple[str, ...] = ("completed", "failed",
                 "cancelled"), timeout_s: float = 20.0) -> dict[str, Any]:
        """Poll a job until its status is one of `statuses`."""
        deadline = time.monotonic() + timeout_s
        job: dict[str, Any] = {}
        with self.client() as client:
            while time.monotonic() < deadline:
                job = client.get(f"/api/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job
                time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {statuses}: {job}")

    def rss_kib(self) -> int:
        """The server process's resident memory."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` and wait for the exit code (killing it past the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)


def server_env(root: Path, token: str, settings: dict[str, str]) -> dict[str, str]:
    """The process environment: ours without MULTIFLOW_*, plus the server's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFLOW_")}
    env.update({
        "MULTIFLOW_API_TOKENS": f"ci:{token}",
        "MULTIFLOW_WORKFLOWS_DIR": str(root / "workflows"),
        "MULTIFLOW_DATA_DIR": str(root / "data"),
        "MULTIFLOW_LOG_FORMAT": "json",
    })
    env.update({f"MULTIFLOW_{k.upper()}": v for k, v in settings.items()})
    return env


def launch(root: Path, **settings: str) -> Server:
    """Start `multiflow run` in `root` and wait for /livez; settings are MULTIFLOW_* values.

    The free port is only free when we looked: if the server cannot bind it, try another.
    """
    root.mkdir(parents=True, exist_ok=True)
    write_workflows(root / "workflows")
    token = secrets.token_urlsafe(16)
    for attempt in range(BIND_ATTEMPTS):
        server = _spawn(root, token, free_port(), settings)
        try:
            wait_ready(server)
        except BaseException:
            with contextlib.suppress(Exception):
                server.stop(signal.SIGKILL, 5)
            if attempt + 1 < BIND_ATTEMPTS and "could not start" in server.log_text():
                continue
            raise
        return server
    raise AssertionError("unreachable")


def _spawn(root: Path, token: str, port: int, settings: dict[str, str]) -> Server:
    env = server_env(root, token, {"port": str(port), **settings})
    log_path = root / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*multiflow_command(), "run"], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return Server(f"http://127.0.0.1:{port}", token, root, proc, log_path)


def wait_ready(server: Server) -> None:
    """Poll /livez until the HTTP server answers (it starts once every workflow registered).

    Not /readyz: a broken bundled workflow makes it 503 for ever, and the tests that
    need readiness check it themselves.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx2.Client(base_url=server.url, timeout=2.0, verify=False) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise AssertionError(f"the server exited {server.proc.returncode}:\n"
                                     f"{server.log_text()}")
            with contextlib.suppress(httpx2.TransportError):
                if client.get("/livez").status_code == 200:
                    return
            time.sleep(0.05)
    raise AssertionError(f"the server did not answer in time:\n{server.log_text()}")


def place(server: Server, workflow_name: str, name: str, data: bytes = b"hello\n") -> str:
    """Write a file into the workflow's input/; its name there."""
    path = server.input_dir(workflow_name) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


def raw_request(server: Server, method: str, target: str, *, body: bytes = b"",
                headers: dict[str, str] | None = None, token: str | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    """Send `target` exactly as given (no normalisation of `..` or `%2f`); one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        sent = {"Connection": "close", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        conn.request(method, target, body=body or None, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        conn.close()
