"""Durable file operations: atomic writes and renames that survive a power cut, and a
lane that runs many of them per worker-thread hop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

TEMP_SUFFIX = ".multiflow-tmp"
T = TypeVar("T")


def fsync_dir(path: str | Path) -> None:
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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2: Any = None  # libc's renameat2, once looked up; False where there is none


def _libc_renameat2() -> Any:
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        with contextlib.suppress(OSError, AttributeError):
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_uint)
            function.restype = ctypes.c_int
            _renameat2 = function
    return _renameat2


def rename_noreplace(source: str | Path, target: str | Path) -> None:
    """Rename `source` to `target`; FileExistsError if `target` exists, checked and renamed
    in one step where the system can (Linux's `renameat2(RENAME_NOREPLACE)`), so two
    renames racing for one name never let the second replace the first.

    Where the filesystem or the system cannot (NFS before Linux 6.x, macOS), the check
    and the rename are two steps; multiflow's own names never race there except uploads
    of one name at once, which the API also keeps apart."""
    function = _libc_renameat2()
    if function:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                    _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(f"{target} exists; refusing to overwrite it")
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    if os.path.lexists(target):
        raise FileExistsError(f"{target} exists; refusing to overwrite it")
    os.rename(source, target)


def move(source: str | Path, target: str | Path, *, durable: bool = True,
         dirty: set[str] | None = None) -> None:
    """Rename `source` to `target`, never over an existing file; `durable` fsyncs the target's
    folder, which on journaling filesystems (ext4, xfs) commits the whole rename.

    A move that may be lost in a power cut without harm (reconciliation redoes it from
    the log) passes `durable=False` and costs no fsync. With `dirty`, a durable move
    adds the folder to that set instead, for its caller to fsync once for many moves
    (see `FileLane`) before anyone relies on them.
    """
    folder = os.path.dirname(target)
    try:
        rename_noreplace(source, target)
    except FileNotFoundError:
        if not os.path.lexists(source):
            raise
        os.makedirs(folder, exist_ok=True)  # a new folder (an archive day, say)
        rename_noreplace(source, target)
    if not durable:
        return
    if dirty is None:
        fsync_dir(folder)
    else:
        dirty.add(folder)


# A lane operation: it does its blocking work and adds to the set the folders whose
# entries it changed and that must be durable before its caller resumes.
LaneCall = Callable[[set[str]], T]


class Done:
    """Set once, awaited by one task (a cancelled wait cancels it): an asyncio future on
    asyncio's loop (made in well under a microsecond, where an anyio Event took ~6), an
    anyio Event elsewhere."""

    __slots__ = ("_event", "_future")

    def __init__(self) -> None:
        loop = _asyncio_loop()
        self._future = loop.create_future() if loop is not None else None
        self._event = anyio.Event() if loop is None else None

    def set(self) -> None:
        if self._future is None:
            assert self._event is not None
            self._event.set()
        elif not self._future.done():  # (cancelled when its waiter was)
            self._future.set_result(None)

    async def wait(self) -> None:
        if self._future is None:
            assert self._event is not None
            await self._event.wait()
        else:
            await self._future


class _LaneOp(Generic[T]):
    __slots__ = ("abandoned", "call", "dirty", "done", "error", "lead", "result")

    def __init__(self, call: LaneCall[T]) -> None:
        self.call = call
        self.dirty: set[str] = set()
        self.done = Done()
        self.lead = False  # handed the lead: this op's caller runs the next batch
        self.abandoned = False  # its caller was cancelled while waiting: never a leader
        self.result: T | None = None
        self.error: BaseException | None = RuntimeError("the file lane stopped before it ran")


class FileLane:
    """Runs blocking file operations in a worker thread, as many per thread hop as are
    waiting, then fsyncs once each folder the batch made dirty.

    A thread hop costs more than a rename, and concurrent jobs move files into the same
    few folders, so one hop and one fsync per batch replace one of each per file (the
    durability each caller gets is the same: its folders are fsynced before it resumes).
    The first caller with nothing running leads: it yields once, so operations issued
    beside it join, and runs the batch; operations issued meanwhile wait, and the first
    of them leads the next batch. Each operation succeeds or fails on its own.
    """

    def __init__(self) -> None:
        self._queue: list[_LaneOp[Any]] = []
        self._busy = False
        self._worker = _Worker()

    async def run(self, call: LaneCall[T]) -> T:
        """Run `call(dirty)` in the next batch; its result, or the exception it raised."""
        op: _LaneOp[T] = _LaneOp(call)
        self._queue.append(op)
        if not self._busy:
            self._busy = True
            await self._lead()
        else:
            try:
                await op.done.wait()
            except BaseException:
                op.abandoned = not op.lead  # it still runs, with the next batch
                raise
            finally:
                if op.lead:  # even when cancelled: the ops queued behind need a leader
                    await self._lead()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    async def _lead(self) -> None:
        # A batch once taken must finish and hand on: other callers wait on it.
        with anyio.CancelScope(shield=True):
            await anyio.lowlevel.checkpoint()
            batch, self._queue = self._queue, []
            try:
                await self._worker.run(batch)
            finally:
                for op in batch:
                    op.lead = False
                    op.done.set()
                successor = next((op for op in self._queue if not op.abandoned), None)
                if successor is None:
                    self._busy = False  # abandoned ops left behind run with the next batch
                else:
                    successor.lead = True
                    successor.done.set()


class _Worker:
    """A lane's own thread, fed batches through a SimpleQueue and answering with one
    `call_soon_threadsafe` per batch: on asyncio that costs less than anyio's worker pool
    (its Condition-based queue and its per-call bookkeeping showed as ~10% of the CPU of a
    busy run). It ends after IDLE_S without work and starts again with the next batch.
    Other event loops (trio) use anyio's pool."""

    IDLE_S = 5.0

    def __init__(self) -> None:
        self._batches: queue.SimpleQueue[tuple[list[_LaneOp[Any]], Any, Any]] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._serving = False

    async def run(self, batch: list[_LaneOp[Any]]) -> None:
        """Run `batch` in the thread; returns once it is done."""
        loop = _asyncio_loop()
        if loop is None:
            await anyio.to_thread.run_sync(_run_batch, batch)
            return
        done = loop.create_future()
        self._batches.put((batch, loop, done))
        with self._lock:
            if not self._serving:
                self._serving = True
                threading.Thread(target=self._serve, name="multiflow-file-lane",
                                 daemon=True).start()
        await done

    def _serve(self) -> None:
        while True:
            try:
                batch, loop, done = self._batches.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._batches.empty():
                        self._serving = False
                        return
                continue
            _run_batch(batch)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_finished, done)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop; None under another event loop."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _finished(done: Any) -> None:
    if not done.done():
        done.set_result(None)


def _run_batch(batch: list[_LaneOp[Any]]) -> None:
    """In the worker thread: every operation, then one fsync per dirty folder."""
    for op in batch:
        try:
            op.result, op.error = op.call(op.dirty), None
        except Exception as exc:  # its own failure, handed to its own caller
            op.error = exc
    dirty = {folder for op in batch if op.error is None for folder in op.dirty}
    failed: dict[str, OSError] = {}
    for folder in sorted(dirty):
        try:
            fsync_dir(folder)
        except OSError as exc:
            failed[folder] = exc
    for op in batch:
        reason = next((failed[f] for f in op.dirty if f in failed), None)
        if op.error is None and reason is not None:
            op.error = reason
