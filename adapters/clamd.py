"""A small async client of clamd's INSTREAM protocol, over a unix socket or TCP.

A scanner that cannot answer never means clean: every connection error, timeout
or reply we do not understand raises ScannerUnavailable, and the job waits.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import structlog

from kernel.ports import Refusal, ScannerUnavailable

log = structlog.get_logger("multiflow.clamd")

CLAMD_STREAM_MAX_BYTES = 25 * 1024**2  # clamd's own StreamMaxLength default
REPLY_MAX_BYTES = 4096
FOUND = re.compile(r"stream: (?P<signature>.+) FOUND")
SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded. ERROR"
SOCKET_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class ScannerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where clamd listens (a unix socket path, or host and port) and the client's limits."""

    socket_path: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    stream_max_bytes: int = CLAMD_STREAM_MAX_BYTES  # keep equal to clamd.conf StreamMaxLength
    chunk_bytes: int = 64 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0  # bounds each chunk sent and the wait for the reply

    def __post_init__(self) -> None:
        if (self.socket_path is None) == (self.port is None):
            raise ValueError("give clamd's socket_path or its port, exactly one of them")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError("port must be within 1..65535")
        if self.stream_max_bytes < 1 or self.chunk_bytes < 1:
            raise ValueError("stream_max_bytes and chunk_bytes must be positive")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")


class _OverLimit(Exception):
    """The file grew past the stream limit while it was being sent."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(f"{size_bytes} bytes read")
        self.size_bytes = size_bytes


class ClamdClient:
    """Scans files with clamd; fits the intake's Scanner port."""

    def __init__(self, settings: ScannerSettings) -> None:
        self.settings = settings

    async def ping(self) -> None:
        """Return once clamd answers PONG; raise ScannerUnavailable otherwise."""
        async with await self._connect() as stream:
            await self._send(stream, b"zPING\0")
            reply = await self._reply(stream)
        if reply != "PONG":
            raise ScannerUnavailable(f"clamd answered PING with {reply!r}")

    async def reachable(self) -> bool:
        """Whether clamd answers PONG now (for /readyz); never raises ScannerUnavailable."""
        try:
            await self.ping()
        except ScannerUnavailable:
            return False
        return True

    async def scan_file(self, path: Path) -> Refusal | None:
        """Infected or TooLarge as a Refusal, None when clean; ScannerUnavailable when unsure."""
        limit = self.settings.stream_max_bytes
        size_bytes = (await anyio.Path(path).stat()).st_size
        if size_bytes > limit:
            return _too_large(size_bytes, limit)  # never sent: clamd would cut it short
        try:
            reply = await self._instream(path)
        except _OverLimit as over:
            return _too_large(over.size_bytes, limit)
        return _verdict(reply)

    async def _instream(self, path: Path) -> str:
        """Stream the file in length-prefixed chunks and return clamd's reply."""
        async with await anyio.open_file(path, "rb") as file, await self._connect() as stream:
            await self._send(stream, b"zINSTREAM\0")
            sent_bytes, whole = await self._send_chunks(stream, file)
            try:
                return await self._reply(stream)
            except ScannerUnavailable as error:
                if whole:
                    raise
                # Over TCP a hang-up with unread data resets the connection, losing the reply.
                raise ScannerUnavailable(
                    f"clamd hung up after {sent_bytes} bytes without a reply; is "
                    "ScannerSettings.stream_max_bytes above clamd's StreamMaxLength?") from error

    async def _send_chunks(self, stream: anyio.abc.SocketStream,
                           file: anyio.AsyncFile[bytes]) -> tuple[int, bool]:
        """Send the file and the terminator; the bytes sent, and False if clamd hung up first."""
        chunk_bytes, limit = self.settings.chunk_bytes, self.settings.stream_max_bytes
        sent_bytes = 0
        while chunk := await file.read(chunk_bytes):
            sent_bytes += len(chunk)
            if sent_bytes > limit:
                raise _OverLimit(sent_bytes)
            if not await self._send(stream, len(chunk).to_bytes(4, "big") + chunk):
                return sent_bytes, False  # clamd hung up (past its StreamMaxLength)
        return sent_bytes, await self._send(stream, b"\0\0\0\0")

    async def _connect(self) -> anyio.abc.SocketStream:
        settings = self.settings
        with _unavailable("connect"), anyio.fail_after(settings.connect_timeout_s):
            if settings.port is None:
                return await anyio.connect_unix(settings.socket_path or "")
            return await anyio.connect_tcp(settings.host, settings.port)

    async def _send(self, stream: anyio.abc.SocketStream, data: bytes) -> bool:
        """Send `data`; False when clamd has hung up, so that its reply can say why."""
        try:
            with _unavailable("send"), anyio.fail_after(self.settings.read_timeout_s):
                await stream.send(data)
        except ScannerUnavailable as error:
            if isinstance(error.__cause__, anyio.BrokenResourceError):
                return False
            raise
        return True

    async def _reply(self, stream: anyio.abc.SocketStream) -> str:
        """One NUL-terminated reply, bounded in size and time."""
        received = b""
        with _unavailable("reply"), anyio.fail_after(self.settings.read_timeout_s):
            while b"\0" not in received:
                if len(received) > REPLY_MAX_BYTES:
                    raise ScannerUnavailable(f"clamd's reply is over {REPLY_MAX_BYTES} bytes")
                received += await stream.receive(REPLY_MAX_BYTES)
        return received.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


@contextmanager
def _unavailable(step: str) -> Iterator[None]:
    """Translate a socket error or a timeout (an OSError too) into ScannerUnavailable."""
    try:
        yield
    except SOCKET_ERRORS as error:
        if not isinstance(error, anyio.BrokenResourceError):
            log.warning("clamd_unavailable", step=step, error=repr(error))
        raise ScannerUnavailable(f"clamd is unavailable ({step}): {error!r}") from error


def _verdict(reply: str) -> Refusal | None:
    """Clean, Infected or TooLarge from clamd's reply; anything else is not an answer."""
    if reply == "stream: OK":
        return None
    if found := FOUND.fullmatch(reply):
        return Refusal("Infected", f"ClamAV found {found['signature']}")
    if reply == SIZE_LIMIT_REPLY:
        return Refusal("TooLarge", "the file is over clamd's StreamMaxLength "
                                   "(ScannerSettings.stream_max_bytes is above clamd.conf's)")
    raise ScannerUnavailable(f"clamd gave an unexpected reply: {reply!r}")


def _too_large(size_bytes: int, limit_bytes: int) -> Refusal:
    return Refusal("TooLarge", f"{size_bytes} bytes is over the scanner's stream limit "
                               f"of {limit_bytes} bytes")
