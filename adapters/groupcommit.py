"""Group commit, shared by the stores: appends issued together share one transaction.

The first appender that finds no write in progress leads: it yields once (so
appends issued beside it join), takes the group, and hands it to the store's
`write` function; appends arriving meanwhile form the next group. Each append
succeeds or fails on its own (its `error`), so one refused append does not fail
its neighbours. See docs/decisions/0002-group-commit.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel

from kernel.events import Event
from kernel.ports import Append, StoreError, StoreUnavailable
from kernel.state import StoredEvent


class PendingAppend:
    """One append waiting in a group: what to append, and (once written) what happened."""

    __slots__ = ("error", "events", "expected_version", "job_id", "result")

    def __init__(self, job_id: str, events: Sequence[Event], expected_version: int) -> None:
        self.job_id = job_id
        self.events = events
        self.expected_version = expected_version
        self.result: list[StoredEvent] = []
        self.error: StoreError | None = None


class _Group:
    __slots__ = ("done", "requests")

    def __init__(self) -> None:
        self.requests: list[PendingAppend] = []
        self.done = anyio.Event()


WriteGroup = Callable[[list[PendingAppend]], Awaitable[None]]


class GroupCommitter:
    """Collects appends into groups and writes each group with one call of `write`."""

    def __init__(self, write: WriteGroup, on_written: Callable[[], None]) -> None:
        self._write = write
        self._on_written = on_written
        self._group = _Group()
        self._leading = False
        self._drained = anyio.Event()

    @property
    def busy(self) -> bool:
        """True while a group is being written or waits to be."""
        return self._leading or bool(self._group.requests)

    async def submit(self, appends: Sequence[Append]) -> list[list[StoredEvent] | StoreError]:
        """Append in the next group; each result is the stored events or the refusal."""
        requests = [PendingAppend(a.job_id, a.events, a.expected_version) for a in appends]
        group = self._group
        group.requests.extend(requests)
        if self._leading:
            await group.done.wait()
        else:
            await self._lead()
        return [r.error if r.error is not None else r.result for r in requests]

    async def drained(self) -> None:
        """Wait until no group is being written."""
        if self._leading:
            await self._drained.wait()

    async def _lead(self) -> None:
        self._leading = True
        try:
            # A group once started must finish: its appenders wait on it.
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # let appends issued beside us join
                while self._group.requests:
                    group, self._group = self._group, _Group()
                    await self._write_group(group)
                    # The appenders just woken often append again at once: let them join.
                    await anyio.lowlevel.checkpoint()
        finally:
            self._leading = False
            self._drained.set()
            self._drained = anyio.Event()

    async def _write_group(self, group: _Group) -> None:
        try:
            await self._write(group.requests)
        except Exception as exc:  # a bug or a driver failure: no appender may hang on it
            # Nothing of the group is known to be durable: every append that was not
            # refused on its own fails, including those already prepared.
            for request in group.requests:
                if request.error is None:
                    request.result = []
                    request.error = StoreUnavailable(f"append failed: {exc!r}")
        finally:
            group.done.set()
            self._on_written()
