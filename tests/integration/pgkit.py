"""PostgreSQL for the tests: the server from MULTIFLOW_TEST_POSTGRES, a schema per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

URL = os.environ.get("MULTIFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def server_or_skip() -> None:
    """Skip without a server; in CI (CI=true) a missing server fails the run instead."""
    try:
        with psycopg.connect(URL, connect_timeout=3):
            pass
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {URL} is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {URL}: {exc}")


def store_url(schema: str) -> str:
    """The store URL of one schema of the test server."""
    sep = "&" if "?" in URL else "?"
    return f"{URL}{sep}schema={schema}"


async def fresh_schema(prefix: str) -> AsyncIterator[str]:
    """A schema name no one uses; dropped afterwards."""
    server_or_skip()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary folder, a free port),
    so that a test may stop and restart it without disturbing anything else."""

    def __init__(self, port: int) -> None:
        self.bin = _postgres_bin()
        # Its own folder under /tmp: pytest's are private to root, and the server runs as
        # the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="multiflow-pg-"))
        self.port = port
        self.data = self.folder / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l",
                  str(self.folder / "server.log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        message = "no PostgreSQL server binaries (initdb) under /usr/lib/postgresql"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found[-1].parent
