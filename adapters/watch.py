"""Hot-folder watchers: a file in `input/` becomes a job once it is complete, and only once.

`BaseWatcher` is the seed's base class: it scans `input/` at start and then
periodically, follows change notifications between scans, decides when a file
is complete (its size and mtime stable for `settle_ms`, or a marker `x.done`
beside `x`) and submits it. `WatchfilesWatcher` gets its notifications from
watchfiles (inotify, or polling for network shares). A workflow may pass its
own subclass to `register_workflow(..., watcher=MyWatcher)`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from kernel.config import WorkflowConfig

log = structlog.get_logger("multiflow.watch")

IGNORED = (".*", "*.tmp", "*.part", "*.crdownload", "*.multiflow-tmp", "*.error.json")
MARKER_SUFFIX = ".done"
RESTART_BACKOFF_MAX_S = 30.0
SUBMITS_IN_FLIGHT = 64
FIRST_RESCAN_S = 1.0  # the scan that closes the gap before notifications are live
HEALTHY_RUN_S = 60.0  # a run this long resets the restart backoff
RUST_TIMEOUT_MS = 250  # how often watchfiles' thread looks at its stop event

# submit(name, completeness, idempotency_key) -> the job id; None when the file will never
# be a job as it is (refused to error/, gone, made a job by the API); LATER when it must
# wait (the name's previous job still runs): the name is looked at again when that job
# ends (`notice`) or at the next scan, its marker kept.
LATER = "later"
Submit = Callable[[str, str, str | None], Awaitable[str | None]]


class _Seen:
    """A file waiting to be complete: its last (size, mtime) and since when it has held."""

    __slots__ = ("identity", "since")

    def __init__(self, identity: tuple[int, int], since: float) -> None:
        self.identity = identity
        self.since = since


class BaseWatcher:
    """Turns complete files in one workflow's input/ into jobs (see the module docstring)."""

    def __init__(self, workflow_name: str, inbox: Path, config: WorkflowConfig,
                 submit: Submit) -> None:
        self.workflow_name = workflow_name
        self.inbox = inbox
        self.config = config
        self.submit = submit
        self.last_heartbeat = time.monotonic()
        self.restarts = 0
        self._waiting: dict[str, _Seen] = {}
        self._submitted: dict[str, tuple[int, int]] = {}
        self._changed = anyio.Event()
        # Every name of a burst goes through `wanted`: its patterns, compiled once.
        ignored = IGNORED + ((f"*{MARKER_SUFFIX}",) if config.marker else ())
        self._ignored = _any_of(ignored + config.exclude)
        self._included = _any_of(config.include) if config.include else None

    # -- what subclasses provide ---------------------------------------------------------

    async def follow(self) -> None:
        """Call `self.notice(names)` as files change; return only when the source ends."""
        raise NotImplementedError(f"{type(self).__name__} must implement follow()")

    # -- the loop ----------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Watch until cancelled; after an error, restart with backoff."""
        started = False
        backoff_s = 0.5
        while True:
            began_s = time.monotonic()
            try:
                async with anyio.create_task_group() as tg:
                    await self.scan()
                    tg.start_soon(self.follow)
                    tg.start_soon(self._rescan_periodically)
                    tg.start_soon(self._settle_loop)
                    if not started:
                        started = True
                        task_status.started()
            except Exception:
                if time.monotonic() - began_s > HEALTHY_RUN_S:
                    backoff_s = 0.5  # it ran well for a while: this is a new failure
                self.restarts += 1
                log.exception("watcher_failed", workflow_name=self.workflow_name,
                              restart_in_s=backoff_s)
                if not started:
                    started = True
                    task_status.started()
            await anyio.sleep(backoff_s)
            backoff_s = min(RESTART_BACKOFF_MAX_S, backoff_s * 2)

    def heartbeat_age_s(self) -> float:
        """Seconds since the watcher last proved it was alive."""
        return time.monotonic() - self.last_heartbeat

    async def scan(self) -> None:
        """Look at every file in input/ (at start, and to catch missed notifications)."""
        names = await anyio.to_thread.run_sync(self._list_inbox)
        present = set(names)
        for gone in [name for name in self._submitted if name not in present]:
            del self._submitted[gone]
        self.notice(names)
        self.last_heartbeat = time.monotonic()

    def notice(self, names: Iterable[str], *, changed: bool = False) -> None:
        """Names (relative to input/) that may have changed: check them soon.

        `changed`: a notification said the file was written or (re)appeared, so even an
        identical size and mtime is new work (a re-drop with `cp -p`).
        """
        now = time.monotonic()
        for name in names:
            if changed:
                self._submitted.pop(name, None)
            if self.wanted(name) and name not in self._waiting:
                self._waiting[name] = _Seen((-1, -1), now)
        self._changed.set()

    def wanted(self, name: str) -> bool:
        """Whether a name may become a job: not temporary, hidden, a marker, or excluded."""
        base = name.rsplit("/", 1)[-1]
        if self._ignored.match(os.path.normcase(base)):
            return False
        return self._included is None or bool(self._included.match(os.path.normcase(base)))

    async def _rescan_periodically(self) -> None:
        # Once soon after the start: a file dropped between the first scan and the moment
        # the notifications are live (watchfiles sets its watch up in the background) is
        # found now, not a whole interval later.
        await anyio.sleep(min(FIRST_RESCAN_S, self.config.rescan_interval_s))
        await self.scan()
        while True:
            await anyio.sleep(self.config.rescan_interval_s)
            await self.scan()

    async def _settle_loop(self) -> None:
        while True:
            wait_s = await self._check_waiting()
            self._changed = anyio.Event()
            with anyio.move_on_after(wait_s):
                await self._changed.wait()
            self.last_heartbeat = time.monotonic()

    async def _check_waiting(self) -> float:
        """Submit the files that are complete; return how long until the next may be."""
        if not self._waiting:
            return 1.0
        names = list(self._waiting)
        identities = await anyio.to_thread.run_sync(self._identities, names)
        now = time.monotonic()
        settle_s = self.config.settle_ms / 1000
        next_s = 1.0
        ready: list[tuple[str, tuple[int, int]]] = []
        for name, identity in zip(names, identities, strict=True):
            seen = self._waiting.get(name)
            if seen is None:
                continue
            if identity is None or self._submitted.get(name) == identity:
                del self._waiting[name]  # gone, or already a job
                continue
            if identity != seen.identity:
                seen.identity, seen.since = identity, now
            ready_in_s = self._ready_in_s(name, seen, now, settle_s)
            if ready_in_s <= 0:
                del self._waiting[name]
                ready.append((name, identity))
            else:
                next_s = min(next_s, ready_in_s)
        await self._submit_all(ready)
        return next_s

    async def _submit_all(self, ready: list[tuple[str, tuple[int, int]]]) -> None:
        # Submits in flight together share the log's group commit: a burst of files
        # becomes jobs in a few commits instead of one commit each. A few submitters
        # share the burst (a task per file would cost more than its submit).
        if len(ready) == 1:
            await self._submit(*ready[0])
            return
        pending = iter(ready)

        async def submitter() -> None:
            for name, identity in pending:
                await self._submit(name, identity)

        async with anyio.create_task_group() as tg:
            for _ in range(min(SUBMITS_IN_FLIGHT, len(ready))):
                tg.start_soon(submitter, name="watch submitter")

    def _ready_in_s(self, name: str, seen: _Seen, now: float, settle_s: float) -> float:
        if self.config.marker:
            marker = self.inbox / (name + MARKER_SUFFIX)
            return 0.0 if marker.exists() else 1.0
        return settle_s - (now - seen.since)

    async def _submit(self, name: str, identity: tuple[int, int]) -> None:
        """Make a job of one ready file. Whatever goes wrong with one file (the store away,
        a bug) is logged and left to the next scan: it never ends the watcher, nor the
        submits of the other files beside it."""
        try:
            await self._submit_one(name, identity)
        except Exception as exc:
            log.warning("watch_submit_failed", workflow_name=self.workflow_name, name=name,
                        error=f"{type(exc).__name__}: {exc}")

    async def _submit_one(self, name: str, identity: tuple[int, int]) -> None:
        key = None
        if self.config.dedupe:
            # Only a regular file is hashed: a link (to a FIFO, to /dev/zero) is judged by
            # the submit's path checks, never read here.
            digest = await anyio.to_thread.run_sync(sha256_of_regular, self.inbox / name)
            key = None if digest is None else "sha256:" + digest
        completeness = "marker" if self.config.marker else f"stable:{self.config.settle_ms}ms"
        job_id = await self.submit(name, completeness, key)
        if job_id == LATER:
            return
        if job_id is not None:
            self._submitted[name] = identity
        if self.config.marker:
            # Done with: a job was made, or the file will never be one. A marker left
            # behind would vouch for the next file of that name while it is being written.
            (self.inbox / (name + MARKER_SUFFIX)).unlink(missing_ok=True)

    # -- file system, in worker threads ------------------------------------------------

    def _list_inbox(self) -> list[str]:
        names: list[str] = []
        for entry in os.scandir(self.inbox):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                names.append(entry.name)
        return names

    def _identities(self, names: list[str]) -> list[tuple[int, int] | None]:
        result: list[tuple[int, int] | None] = []
        for name in names:
            try:
                info = os.lstat(self.inbox / name)
            except FileNotFoundError:
                result.append(None)
                continue
            regular = stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)
            result.append((info.st_size, info.st_mtime_ns) if regular else None)
        return result


class WatchfilesWatcher(BaseWatcher):
    """Notifications from watchfiles: inotify, or polling where inotify does not work."""

    async def follow(self) -> None:
        """Feed watchfiles' change sets to `notice`."""
        from watchfiles._rust_notify import WatchfilesRustInternalError

        while True:
            lost: list[Exception] = []
            try:
                await self._follow_once()
                return
            except* WatchfilesRustInternalError as group:  # raised inside watchfiles' tasks
                lost.extend(group.exceptions)
            # watchfiles cannot report a name that is not UTF-8: look with a scan (which
            # refuses such a file to error/) and follow again.
            log.warning("watch_notification_lost", workflow_name=self.workflow_name,
                        error=str(lost[0]))
            await self.scan()

    async def _follow_once(self) -> None:
        import watchfiles

        stop = anyio.Event()
        polling = self.config.watch_mode == "poll"
        try:
            async for changes in watchfiles.awatch(
                self.inbox, watch_filter=None, debounce=50, step=10, stop_event=stop,
                rust_timeout=RUST_TIMEOUT_MS, recursive=False, force_polling=polling,
                poll_delay_ms=int(self.config.poll_interval_s * 1000),
            ):
                self.notice(self._names(changes), changed=True)
        finally:
            stop.set()

    def _names(self, changes: set[tuple[Any, str]]) -> list[str]:
        names = []
        for _, path in changes:
            relative = os.path.relpath(path, self.inbox)
            if self.config.marker and relative.endswith(MARKER_SUFFIX):
                relative = relative.removesuffix(MARKER_SUFFIX)
            names.append(relative)
        return names


def _any_of(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex matching a name that any of the glob `patterns` match (as `fnmatch`)."""
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(os.path.normcase(p))})"
                               for p in patterns))


def sha256_of_regular(path: Path) -> str | None:
    """The sha256 of a regular file (not followed through a link); None for anything else,
    and for a file that cannot be read (its submit then finds why: intake refuses an
    unreadable file to error/, a vanished one is gone)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return sha256_of(path)
    except OSError:
        return None


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
