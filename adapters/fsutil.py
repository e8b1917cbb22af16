"""Durable file operations: atomic writes and renames that survive a power cut."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".multiflow-tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(target: Path) -> Path:
    """A hidden temporary name beside `target`, swept by reconciliation if left behind."""
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_write(target: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write `target` through a temporary name: fsync, rename, fsync the folder.

    On an exception the temporary file is removed and `target` is untouched.
    """
    if "w" not in mode and "x" not in mode:
        raise ValueError("atomic_write opens files for writing only")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    handle = open(tmp, mode.replace("x", "w"))  # noqa: SIM115 (closed below, before rename)
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: Path, data: bytes) -> None:
    """Write a small file atomically."""
    with atomic_write(target) as handle:
        handle.write(data)


def move(source: Path, target: Path, *, durable: bool = True) -> None:
    """Rename `source` to `target`, never over an existing file; `durable` fsyncs the target's
    folder, which on journaling filesystems (ext4, xfs) commits the whole rename.

    A move that may be lost in a power cut without harm (reconciliation redoes it from
    the log) passes `durable=False` and costs no fsync.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise FileExistsError(f"{target} exists; refusing to overwrite it")
    os.rename(source, target)
    if durable:
        fsync_dir(target.parent)
