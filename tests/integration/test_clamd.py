"""The clamd client against a real clamd (EICAR-only database) and against fake listeners."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import pytest

from adapters.clamd import ClamdClient, ScannerSettings
from adapters.intake import IntakeChecker
from kernel.config import WorkflowConfig
from kernel.ports import Refusal, ScannerUnavailable
from kernel.task import BaseProcessor
from tests.integration.conftest_clamd import (
    CLAMD_STREAM_MAX_BYTES,
    EICAR,
    EICAR_SIGNATURE,
    clamd_fixture,  # noqa: F401 (registers the `clamd` fixture)
    running_clamd,
    stop,
)

pytestmark = pytest.mark.anyio

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


def client_for(socket_path: Path, **overrides: float) -> ClamdClient:
    """A client of the clamd at `socket_path`, with optional overrides."""
    settings = ScannerSettings(socket_path=str(socket_path))
    return ClamdClient(msgspec.structs.replace(settings, **overrides))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@asynccontextmanager
async def fake_clamd(socket_path: Path, handler: Handler) -> AsyncIterator[list[bytes]]:
    """A unix listener that records what each connection sent before `handler` returned."""
    received: list[bytes] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            received.append(b"")
            await handler(stream)

    listener = await anyio.create_unix_listener(socket_path)
    async with anyio.create_task_group() as tg, listener:
        tg.start_soon(listener.serve, serve)
        yield received
        tg.cancel_scope.cancel()


# -- a real clamd ---------------------------------------------------------------------------


async def test_clean_file_passes(clamd: Path, tmp_path: Path) -> None:
    """clamd answers PONG, and a clean file scans as clean (None)."""
    client = client_for(clamd)
    await client.ping()
    assert await client.scan_file(write(tmp_path, "clean.txt", b"hello world\n" * 1000)) is None


async def test_eicar_is_infected(clamd: Path, tmp_path: Path) -> None:
    """The EICAR test file is refused as Infected, naming the signature."""
    refusal = await client_for(clamd).scan_file(write(tmp_path, "eicar.txt", EICAR))
    assert refusal is not None and refusal.error_type == "Infected"
    assert EICAR_SIGNATURE in refusal.message


async def test_eicar_is_refused_at_intake(clamd: Path, tmp_path: Path) -> None:
    """IntakeChecker reaches clamd from its worker thread and refuses EICAR as Infected."""
    checker = IntakeChecker(client_for(clamd))
    config = WorkflowConfig(scan=True, allowed_types=(".txt",))
    path = write(tmp_path, "eicar.txt", EICAR)
    refusal = await anyio.to_thread.run_sync(checker.check, path, config, BaseProcessor())
    assert refusal is not None and refusal.error_type == "Infected"
    clean = write(tmp_path, "clean.txt", b"fine\n")
    assert await anyio.to_thread.run_sync(checker.check, clean, config, BaseProcessor()) is None


async def test_over_clients_limit_is_too_large(clamd: Path, tmp_path: Path) -> None:
    """A file over the client's stream limit is TooLarge before anything is sent."""
    path = write(tmp_path, "big.bin", bytes(2048))
    refusal = await client_for(clamd, stream_max_bytes=1024).scan_file(path)
    assert refusal == Refusal("TooLarge",
                              "2048 bytes is over the scanner's stream limit of 1024 bytes")


async def test_over_clamds_own_limit_is_too_large(clamd: Path, tmp_path: Path) -> None:
    """When clamd's StreamMaxLength is the lower one, its size-limit reply reads as TooLarge."""
    path = write(tmp_path, "big.bin", b"a" * (CLAMD_STREAM_MAX_BYTES * 3 // 2))
    client = client_for(clamd, stream_max_bytes=CLAMD_STREAM_MAX_BYTES * 4)
    refusal = await client.scan_file(path)
    assert refusal is not None and refusal.error_type == "TooLarge"
    assert "StreamMaxLength" in refusal.message


async def test_stopped_clamd_is_unavailable(tmp_path_factory: pytest.TempPathFactory,
                                            tmp_path: Path) -> None:
    """A stopped clamd is not reachable; ping, scan and intake raise ScannerUnavailable."""
    path = write(tmp_path, "clean.txt", b"hello\n")
    async with running_clamd(tmp_path_factory.mktemp("clamd")) as running:
        client = client_for(running.socket_path)
        assert await client.scan_file(path) is None
        assert await client.reachable()
        await stop(running)
        assert not await client.reachable()
        with pytest.raises(ScannerUnavailable):
            await client.ping()
        with pytest.raises(ScannerUnavailable):
            await client.scan_file(path)
        checker, config = IntakeChecker(client), WorkflowConfig(scan=True)
        with pytest.raises(ScannerUnavailable):
            await anyio.to_thread.run_sync(checker.check, path, config, BaseProcessor())


async def test_empty_database_is_unavailable(tmp_path_factory: pytest.TempPathFactory,
                                             tmp_path: Path) -> None:
    """clamd exits on an empty database, and that reads as unavailable, never as clean."""
    path = write(tmp_path, "eicar.txt", EICAR)
    directory = tmp_path_factory.mktemp("clamd")
    async with running_clamd(directory, signatures=False, ready=False) as running:
        with anyio.fail_after(30):
            assert await running.process.wait() != 0
        with pytest.raises(ScannerUnavailable):
            await client_for(running.socket_path).scan_file(path)


async def test_clamd_over_tcp(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The client speaks the same protocol to clamd on 127.0.0.1:port, and never says clean."""
    with socket.socket() as probe:  # a free port; clamd binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running_clamd(tmp_path_factory.mktemp("clamd"), tcp_port=port):
        client = ClamdClient(ScannerSettings(port=port))
        await client.ping()
        refusal = await client.scan_file(write(tmp_path, "eicar.txt", EICAR))
        assert refusal is not None and refusal.error_type == "Infected"
        # Past clamd's own limit a TCP reset may swallow its reply: TooLarge or wait, never clean.
        big = write(tmp_path, "big.bin", b"a" * (CLAMD_STREAM_MAX_BYTES * 3))
        big_client = ClamdClient(ScannerSettings(port=port, stream_max_bytes=2**32))
        try:
            assert await big_client.scan_file(big) is not None
        except ScannerUnavailable as error:
            assert "StreamMaxLength" in str(error)


# -- fake listeners: what the client does with odd or absent answers ---------------------


async def test_oversize_file_is_never_sent(tmp_path: Path) -> None:
    """Over the client's limit the client does not even connect: nothing reaches the socket."""
    async def answer(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"stream: OK\0")

    socket_path = tmp_path / "fake.sock"
    path = write(tmp_path, "big.bin", bytes(4096))
    async with fake_clamd(socket_path, answer) as connections:
        client = client_for(socket_path, stream_max_bytes=4095)
        refusal = await client.scan_file(path)
        assert refusal is not None and refusal.error_type == "TooLarge"
        assert connections == []
        assert await client_for(socket_path).scan_file(path) is None
        assert len(connections) == 1


async def test_unexpected_reply_is_unavailable(tmp_path: Path) -> None:
    """A reply that is neither OK, FOUND nor the size limit is not an answer."""
    async def answer(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"stream: Can't allocate memory ERROR\0")

    socket_path = tmp_path / "fake.sock"
    async with fake_clamd(socket_path, answer):
        with pytest.raises(ScannerUnavailable, match="unexpected reply"):
            await client_for(socket_path).scan_file(write(tmp_path, "a.txt", b"a"))


async def test_silent_scanner_times_out(tmp_path: Path) -> None:
    """A scanner that accepts and never answers is unavailable after the read timeout."""
    async def hang(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()

    socket_path = tmp_path / "fake.sock"
    async with fake_clamd(socket_path, hang):
        client = client_for(socket_path, read_timeout_s=0.2)
        with anyio.fail_after(5), pytest.raises(ScannerUnavailable, match="TimeoutError"):
            await client.scan_file(write(tmp_path, "a.txt", b"a"))


async def test_hang_up_without_reply_is_unavailable(tmp_path: Path) -> None:
    """A scanner that closes the connection without a reply is unavailable."""
    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        await stream.receive()

    socket_path = tmp_path / "fake.sock"
    async with fake_clamd(socket_path, hang_up):
        with pytest.raises(ScannerUnavailable):
            await client_for(socket_path).ping()


async def test_no_socket_is_unavailable(tmp_path: Path) -> None:
    """No clamd listening at the path is unavailable, at ping and at scan."""
    client = client_for(tmp_path / "nobody.sock")
    with pytest.raises(ScannerUnavailable):
        await client.ping()
    with pytest.raises(ScannerUnavailable):
        await client.scan_file(write(tmp_path, "a.txt", b"a"))


@pytest.mark.parametrize("settings", [{}, {"socket_path": "/x", "port": 3310},
                                      {"port": 0}, {"port": 3310, "connect_timeout_s": 0}])
def test_settings_are_validated(settings: dict[str, object]) -> None:
    """Exactly one of socket_path and port, a valid port and positive timeouts."""
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(settings, ScannerSettings)
