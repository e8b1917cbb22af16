"""Streaming gzip and its check: memory stays at a few chunks whatever the file's size."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

import msgspec

from ..config import CHUNK_BYTES, INFLATE_BYTES_MAX

GZIP_WBITS = 31  # zlib's gzip container: a header with mtime 0, so equal input, equal output
OnChunk = Callable[[int], None]  # called with the bytes done so far, between chunks


class Digest(Protocol):
    """A running hash (hashlib's objects)."""

    def update(self, data: bytes, /) -> None:
        """Add bytes."""
        ...


class Inflater(Protocol):
    """A zlib decompressor."""

    @property
    def unconsumed_tail(self) -> bytes:
        """Input held back by max_length."""
        ...

    @property
    def eof(self) -> bool:
        """Whether the end of the stream was reached."""
        ...

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        """Inflate, at most max_length bytes."""
        ...


class Compressed(msgspec.Struct, frozen=True, kw_only=True):
    """What a compression pass read and wrote."""

    size_bytes: int
    sha256: str
    gz_size_bytes: int
    gz_sha256: str


def read_chunks(path: Path, on_chunk: OnChunk) -> Iterator[bytes]:
    """The file's bytes, one chunk at a time, reporting the bytes read after each."""
    done = 0
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            yield chunk
            done += len(chunk)
            on_chunk(done)


def gzip_file(source: Path, out: IO[bytes], level: int, on_chunk: OnChunk) -> Compressed:
    """Write `source` gzipped to `out`, hashing what was read and what was written."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, GZIP_WBITS)
    read_hash, written_hash = hashlib.sha256(), hashlib.sha256()
    size = written = 0
    for chunk in read_chunks(source, on_chunk):
        read_hash.update(chunk)
        size += len(chunk)
        written += _emit(out, written_hash, compressor.compress(chunk))
    written += _emit(out, written_hash, compressor.flush())
    return Compressed(size_bytes=size, sha256=read_hash.hexdigest(),
                      gz_size_bytes=written, gz_sha256=written_hash.hexdigest())


def _emit(out: IO[bytes], digest: Digest, data: bytes) -> int:
    if data:
        out.write(data)
        digest.update(data)
    return len(data)


def gunzip_digest(path: Path, on_chunk: OnChunk) -> tuple[int, str]:
    """Inflate a one-member gzip file: (size, sha256) of its content; ValueError if damaged."""
    inflater = zlib.decompressobj(GZIP_WBITS)
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in read_chunks(path, on_chunk):
            if inflater.eof:
                raise ValueError("data after the end of the gzip stream")
            for data in _inflate(inflater, chunk):
                digest.update(data)
                size += len(data)
    except zlib.error as exc:
        raise ValueError(f"not a valid gzip stream: {exc}") from None
    if not inflater.eof or inflater.unused_data:
        raise ValueError("the gzip stream is cut short or followed by other data")
    return size, digest.hexdigest()


def _inflate(inflater: Inflater, chunk: bytes) -> Iterator[bytes]:
    """Inflate one chunk in bounded pieces (a MiB of zeros inflates from ~1 KiB)."""
    yield inflater.decompress(chunk, INFLATE_BYTES_MAX)
    while inflater.unconsumed_tail and not inflater.eof:
        yield inflater.decompress(inflater.unconsumed_tail, INFLATE_BYTES_MAX)
