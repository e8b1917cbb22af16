"""A real clamd for tests: offline, on a temporary socket, with an EICAR-only database.

Import `clamd_fixture` into a test module to get the `clamd` fixture; it skips when
clamd is not installed (Debian: `apt-get install clamav-daemon`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest

from adapters.clamd import ClamdClient, ScannerSettings
from kernel.ports import ScannerUnavailable

# The EICAR test file: harmless, and detected by every scanner that loads its signature.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Multiflow.Test.EICAR"
CLAMD_STREAM_MAX_BYTES = 1024**2  # the fixture's clamd.conf StreamMaxLength
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CLAMD = shutil.which("clamd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")


class RunningClamd(msgspec.Struct, frozen=True):
    """A clamd we started: its socket, its process and the file its output goes to."""

    socket_path: Path
    process: anyio.abc.Process
    log_path: Path

    def settings(self, **overrides: float) -> ScannerSettings:
        """Client settings for this clamd, with optional overrides (timeouts, limits)."""
        return msgspec.structs.replace(ScannerSettings(socket_path=str(self.socket_path)),
                                       **overrides)


def write_config(directory: Path, *, signatures: bool, tcp_port: int | None = None) -> Path:
    """A foreground clamd.conf and a database directory (EICAR only, or empty) in `directory`."""
    database = directory / "db"
    database.mkdir()
    if signatures:  # .hdb: md5:size:name of the whole file
        digest = hashlib.md5(EICAR).hexdigest()
        (database / "eicar.hdb").write_text(f"{digest}:{len(EICAR)}:{EICAR_SIGNATURE}\n")
    lines = [f"LocalSocket {directory / 'clamd.sock'}", f"DatabaseDirectory {database}",
             "Foreground yes", f"LogFile {directory / 'clamd.log'}",
             f"StreamMaxLength {CLAMD_STREAM_MAX_BYTES // 1024}K"]
    if tcp_port is not None:
        lines += [f"TCPSocket {tcp_port}", "TCPAddr 127.0.0.1"]
    config = directory / "clamd.conf"
    config.write_text("\n".join(lines) + "\n")
    return config


@asynccontextmanager
async def running_clamd(directory: Path, *, signatures: bool = True, ready: bool = True,
                        tcp_port: int | None = None) -> AsyncIterator[RunningClamd]:
    """Start clamd in `directory`, wait for PONG (when `ready`), stop it by its pid at the end."""
    if CLAMD is None:
        pytest.skip("clamd is not installed (Debian package clamav-daemon)")
    config = write_config(directory, signatures=signatures, tcp_port=tcp_port)
    output = directory / "clamd.out"
    with output.open("wb") as sink:
        process = await anyio.open_process([CLAMD, "-c", str(config)],
                                           stdout=sink, stderr=subprocess.STDOUT)
    clamd = RunningClamd(directory / "clamd.sock", process, output)
    try:
        if ready:
            await wait_ready(clamd)
        yield clamd
    finally:
        with anyio.CancelScope(shield=True):
            await stop(clamd)


async def wait_ready(clamd: RunningClamd) -> None:
    """Ping until PONG; fail with clamd's output if it exits or is not ready in time."""
    client = ClamdClient(clamd.settings(connect_timeout_s=1.0, read_timeout_s=1.0))
    with anyio.fail_after(READY_TIMEOUT_S):
        while clamd.process.returncode is None:
            try:
                await client.ping()
            except ScannerUnavailable:
                await anyio.sleep(0.05)
            else:
                return
    output = clamd.log_path.read_text(errors="replace")
    pytest.fail(f"clamd exited with {clamd.process.returncode}:\n{output}")


async def stop(clamd: RunningClamd) -> None:
    """Terminate clamd by its pid and reap it; kill it if it does not stop in time."""
    if clamd.process.returncode is not None:
        return
    clamd.process.terminate()
    with anyio.move_on_after(STOP_TIMEOUT_S) as waited:
        await clamd.process.wait()
    if waited.cancelled_caught:
        clamd.process.kill()
        await clamd.process.wait()


@pytest.fixture(name="clamd")
async def clamd_fixture(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A running clamd that knows only EICAR; yields its unix socket path."""
    # A short directory: a unix socket path must fit in 108 bytes.
    async with running_clamd(tmp_path_factory.mktemp("clamd")) as running:
        yield running.socket_path
