"""Group commit on PostgreSQL: appends (and claims) issued together share one transaction.

The same leader scheme as `adapters.groupcommit` (the SQLite store's), without its
thread hop, since psycopg's async driver runs on the event loop; a request also
carries the claim limits it is taken under (`Cluster.append_claims`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel

from adapters.ledger import conditions
from kernel.ports import Append, ClaimLimits, StoreError, StoreUnavailable
from kernel.state import StoredEvent


class Request:
    """One append in a group; `limits` is set for a claim's candidate."""

    __slots__ = ("error", "events", "expected_version", "job_id", "limits", "requires",
                 "result")

    def __init__(self, append: Append, limits: ClaimLimits | None = None,
                 requires: tuple[Request, ...] = ()) -> None:
        self.job_id = append.job_id
        self.events = append.events
        self.expected_version = append.expected_version
        self.limits = limits
        self.requires = requires  # stored only if these were (Append.if_all_before)
        self.result: list[StoredEvent] = []
        self.error: StoreError | None = None


WriteGroup = Callable[[list[Request]], Awaitable[None]]


class _Group:
    __slots__ = ("done", "requests")

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.done = anyio.Event()


class Committer:
    """The first request that finds no write in progress leads: it yields once so that
    requests issued beside it join, writes the group, and goes on while more arrived."""

    def __init__(self, write: WriteGroup, on_written: Callable[[], None]) -> None:
        self._write = write
        self._on_written = on_written
        self._group = _Group()
        self._leading = False
        self._idle = anyio.Event()

    async def submit(self, requests: list[Request]) -> None:
        """Write `requests` in the next group; each gets its `result` or `error`."""
        group = self._group
        group.requests.extend(requests)
        if self._leading:
            await group.done.wait()
        else:
            await self._lead()

    async def drained(self) -> None:
        """Wait until no group is being written."""
        while self._leading:
            await self._idle.wait()

    async def _lead(self) -> None:
        self._leading = True
        try:
            with anyio.CancelScope(shield=True):  # a started group must finish: others wait
                await anyio.lowlevel.checkpoint()
                while self._group.requests:
                    group, self._group = self._group, _Group()
                    try:
                        await self._write(group.requests)
                    except Exception as exc:  # no appender may hang on a bug
                        for request in group.requests:
                            if request.error is None:
                                request.result = []
                                request.error = StoreUnavailable(f"append failed: {exc!r}")
                    finally:
                        group.done.set()
                        self._on_written()
                    await anyio.lowlevel.checkpoint()
        finally:
            self._leading = False
            self._idle.set()
            self._idle = anyio.Event()


def requests_of(appends: Sequence[Append], limits: ClaimLimits | None = None,
                claims: int = 0) -> list[Request]:
    """Requests for a batch, each linked to the appends it depends on; the last `claims`
    are a claim's candidates under `limits`."""
    requests: list[Request] = []
    first_claim = len(appends) - claims
    for index, (append, requires) in enumerate(zip(appends, conditions(appends), strict=True)):
        requests.append(Request(append, limits if index >= first_claim else None,
                                tuple(requests[i] for i in requires)))
    return requests
