"""Group commit for the SQLite store: one writer thread, appends issued together share a commit.

The writer thread owns the writer connection. Appends join the open group on the
event loop; the thread takes the whole open group as soon as it is free, writes it
(the store's `write`: one transaction, one fsync) and hands it back to the loop with
`call_soon_threadsafe`. While one group commits the next one gathers, so the loop's
work and the disk's overlap, and the thread never waits for the loop to hand it work.
Each append succeeds or fails on its own (its `error`), so one refused append does
not fail its neighbours. Other work on the writer connection (side tables, rebuild,
close) runs on the same thread, in order with the groups, through `call`.
See docs/decisions/0002-group-commit.md and 0006-writer-thread.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from adapters.ledger import conditions
from kernel.events import Event
from kernel.ports import Append, StoreError, StoreUnavailable
from kernel.state import StoredEvent

T = TypeVar("T")
# An idle writer starts on the open group at the end of the loop's turn, or as soon as
# the group holds this many appends: then the loop's work on the next appends overlaps
# with the commit of these, instead of every in-flight append waiting for one commit.
GROUP_EARLY_START = 64
WriteGroup = Callable[[list["PendingAppend"]], None]
Written = Callable[[list["PendingAppend"]], None]


class PendingAppend:
    """One append waiting in a group: what to append, and (once written) what happened."""

    __slots__ = ("error", "events", "expected_version", "job_id", "requires", "result")

    def __init__(self, job_id: str, events: Sequence[Event], expected_version: int,
                 requires: tuple[PendingAppend, ...] = ()) -> None:
        self.job_id = job_id
        self.events = events
        self.expected_version = expected_version
        self.requires = requires  # stored only if these were (Append.if_all_before)
        self.result: list[StoredEvent] = []
        self.error: StoreError | None = None


class _Group:
    """Appends that share one transaction; `done` is set on the loop once it is written."""

    __slots__ = ("done", "requests")

    def __init__(self) -> None:
        self.requests: list[PendingAppend] = []
        self.done = asyncio.Event()


class _Call:
    """Other work for the writer thread; its outcome goes to `future` on the loop."""

    __slots__ = ("args", "func", "future")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...],
                 future: asyncio.Future[Any]) -> None:
        self.func, self.args, self.future = func, args, future


class GroupCommitter:
    """The writer thread and its queue: groups of appends, and calls, in arrival order.

    `write(requests)` runs on the writer thread and fills each request's `result` or
    `error`; `written(requests)` runs on the event loop afterwards, in commit order.
    """

    def __init__(self, write: WriteGroup, written: Written, *, name: str = "multiflow-writer"
                 ) -> None:
        self._write = write
        self._written = written
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Group | _Call] = deque()  # guarded by _lock
        self._open: _Group | None = None  # the group new appends join (queued already)
        self._idle = False  # the thread waits on _wake
        self._stopping = False
        self._outstanding = 0  # groups and calls not yet handed back (read and written on the loop)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """True while a group or a call is queued, running, or not yet handed back."""
        return self._outstanding > 0

    async def submit(self, appends: Sequence[Append]) -> list[list[StoredEvent] | StoreError]:
        """Append in the open group; each result is the stored events or the refusal."""
        requests: list[PendingAppend] = []
        for append, requires in zip(appends, conditions(appends), strict=True):
            requests.append(PendingAppend(append.job_id, append.events, append.expected_version,
                                          tuple(requests[i] for i in requires)))
        await self._join(requests)
        return [r.error if r.error is not None else r.result for r in requests]

    async def append(self, job_id: str, events: Sequence[Event], expected_version: int
                     ) -> list[StoredEvent]:
        """One append in the open group: its stored events, or its refusal raised."""
        request = PendingAppend(job_id, events, expected_version)
        await self._join((request,))
        if request.error is not None:
            raise request.error
        return request.result

    async def _join(self, requests: Sequence[PendingAppend]) -> None:
        with self._lock:
            if self._stopping:
                raise StoreUnavailable("the writer has stopped")
            group = self._open
            if group is None:
                group = self._open = _Group()
                self._queue.append(group)
                self._outstanding += 1
                if self._idle:
                    # Let the appends issued in this turn of the loop join first.
                    self._loop.call_soon(self._kick)
            group.requests.extend(requests)
            if self._idle and len(group.requests) >= GROUP_EARLY_START:
                self._wake.notify()  # enough to be worth a commit while more arrive
        # A group once taken is written whatever happens to its appenders: waiting is all
        # a cancellation can stop.
        await group.done.wait()

    def _kick(self) -> None:
        with self._lock:
            if self._idle and self._queue:
                self._wake.notify()

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` on the writer thread after the work queued before it."""
        future: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            if self._stopping:
                raise StoreUnavailable("the writer has stopped")
            self._queue.append(_Call(func, args, future))
            self._outstanding += 1
            if self._idle:
                self._wake.notify()
        # Shielded: the call runs anyway, and its caller (a close, a rebuild) must not
        # leave while the connection is in use.
        return await asyncio.shield(future)

    async def drained(self) -> None:
        """Wait until everything queued so far has been written."""
        await self.call(_nothing)

    async def stop(self, last: Callable[[], None]) -> None:
        """Refuse new work, finish what is queued, run `last` (closing) and end the thread."""
        future: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._queue.append(_Call(last, (), future))
            self._outstanding += 1
            self._wake.notify()
        await asyncio.shield(future)

    # -- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if self._stopping:
                        return
                    self._idle = True
                    self._wake.wait()
                    self._idle = False
                item = self._queue.popleft()
                if item is self._open:
                    self._open = None  # appends from now on form the next group
            if isinstance(item, _Group):
                self._write_group(item)
            else:
                self._run_call(item)
            del item  # not kept while the thread waits: a group holds all its appends

    def _write_group(self, group: _Group) -> None:
        try:
            self._write(group.requests)
        except Exception as exc:  # a bug or a driver failure: no appender may hang on it
            # Nothing of the group is known to be durable: every append that was not
            # refused on its own fails, including those already prepared.
            for request in group.requests:
                if request.error is None:
                    request.result = []
                    request.error = StoreUnavailable(f"append failed: {exc!r}")
        self._to_loop(self._finish, group)

    def _finish(self, group: _Group) -> None:
        self._outstanding -= 1
        try:
            self._written(group.requests)
        finally:
            group.done.set()

    def _settle(self, future: asyncio.Future[Any], result: Any,
                error: BaseException | None) -> None:
        self._outstanding -= 1
        if future.done():  # its caller was cancelled (the call ran anyway)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.func(*call.args)
        except BaseException as exc:  # handed to the caller, who re-raises it
            self._to_loop(self._settle, call.future, None, exc)
        else:
            self._to_loop(self._settle, call.future, result, None)

    def _to_loop(self, func: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to wake
            self._loop.call_soon_threadsafe(func, *args)


def _nothing() -> None:
    return None
