"""The only wiring: `Kernel`, the facade that embeds multiflow in any asyncio app.

    async with Kernel.open(store="sqlite:///data/multiflow.db", data_dir="data") as kernel:
        kernel.register_workflow("thumbs", ThumbProcessor())
        job = await kernel.submit("thumbs", "a.png", priority=5)   # data/thumbs/input/a.png
        await kernel.wait(job.id)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from adapters.clamd import ClamdClient, ScannerSettings
from adapters.clock import SystemClock, UlidEntropy
from adapters.executor import LocalExecutor
from adapters.files import FileNotInInput, HotFolders, PathOutsideRoot
from adapters.intake import IntakeChecker
from adapters.memory import MemoryEventStore
from adapters.metrics import Metrics
from adapters.observe import Observer
from adapters.sqlite import SqliteEventStore
from adapters.watch import LATER, BaseWatcher, Submit, WatchfilesWatcher
from kernel import layout
from kernel.config import WorkflowConfig
from kernel.decide import Rejected
from kernel.manager import JobManager, Submitted, Workflow
from kernel.ports import Clock, Cluster, Entropy, EventStore, Executor, JobPage, JobQuery
from kernel.state import Job, Status, StoredEvent
from kernel.task import BaseProcessor

DEFAULT_DRAIN_GRACE_S = 30.0
# Names waiting for their job to end, by job: a job that ends on another node is never
# settled here (its name is picked up by the next rescan), so the oldest are forgotten.
WAITING_REMEMBERED = 10_000
log = structlog.get_logger("multiflow.kernel")


def utc_now() -> datetime:
    """Wall-clock UTC, for the shell's own facts (file names of rejected files)."""
    return datetime.now(UTC)


async def open_store(url: str | None, data_dir: Path) -> EventStore:
    """Open the store a URL names: `sqlite:///rel/path.db`, `sqlite:////abs.db`, `memory://`,
    `postgresql://user@host:5432/db?schema=multiflow`."""
    if url is None:
        return await SqliteEventStore.open(data_dir / "multiflow.db")
    if url.startswith("memory://"):
        return MemoryEventStore()
    if url.startswith("sqlite:///"):
        return await SqliteEventStore.open(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from adapters.postgres import PostgresEventStore

        return await PostgresEventStore.open(url)
    raise ValueError(f"unknown store URL {url!r}: use sqlite:///PATH, postgresql://... "
                     "or memory://")


class Kernel:
    """multiflow embedded: a store, the hot folders and one JobManager, under one task group."""

    def __init__(self, manager: JobManager, store: EventStore, files: HotFolders,
                 tg: anyio.abc.TaskGroup) -> None:
        self.manager = manager
        self.store = store
        self.files = files
        self._tg = tg
        self._recovered: dict[str, anyio.Event] = {}
        self.watchers: dict[str, BaseWatcher] = {}
        self.metrics: Metrics | None = None
        self.scanner: ClamdClient | None = None
        self.observer: Observer | None = None
        self._api_owned: dict[tuple[str, str], int] = {}  # uploads being placed, by name
        # Names dropped again while their job ran, by that job: looked at when it ends.
        self._waiting_for: dict[str, tuple[str, str]] = {}
        self.files.on_settled = self._settled
        self._watcher_scopes: list[anyio.CancelScope] = []  # one per running watcher

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        store: str | EventStore | None = None,
        data_dir: str | Path = "data",
        *,
        concurrency: int | None = 1,
        node_concurrency: int | None = None,
        aging_interval_s: float | None = 60.0,
        drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
        clock: Clock | None = None,
        entropy: Entropy | None = None,
        executor: Executor | None = None,
        worker_name: str = "",
        scanner: ScannerSettings | None = None,
        lease_s: float = 15.0,
        heartbeat_s: float = 3.0,
    ) -> AsyncIterator[Kernel]:
        """Open the store, start the manager; on exit drain running jobs and close the store.

        `concurrency` is how many jobs run at once: on this machine, or in the whole
        cluster when the store is shared (PostgreSQL; None there: no cluster-wide limit).
        `node_concurrency` caps this node (default: `concurrency`). A node's running jobs
        are recovered by the others `lease_s` after its last heartbeat.
        """
        root = Path(data_dir)
        await anyio.Path(root).mkdir(parents=True, exist_ok=True)
        event_store = store if not isinstance(store, str | None) else await open_store(store, root)
        scanner_client = ClamdClient(scanner) if scanner is not None else None
        files = HotFolders(root, IntakeChecker(scanner_client))
        metrics = Metrics()
        if isinstance(event_store, SqliteEventStore):
            event_store.commit_observer = metrics.observe_commit
        cluster = event_store if isinstance(event_store, Cluster) else None
        observer = Observer(event_store, metrics, node=cluster.node_id if cluster else None)
        node_limit = node_concurrency or concurrency
        if node_limit is None:
            raise ValueError("set concurrency or node_concurrency: a node needs a limit")
        manager = JobManager(event_store, files, executor or LocalExecutor.for_jobs(node_limit),
                             clock=clock or SystemClock(), entropy=entropy or UlidEntropy(),
                             concurrency=node_limit, aging_interval_s=aging_interval_s,
                             worker_name=worker_name, cluster=cluster,
                             cluster_concurrency=concurrency, lease_s=lease_s,
                             heartbeat_s=heartbeat_s)
        try:
            async with anyio.create_task_group() as tg:
                if cluster is not None:
                    await tg.start(event_store.listen)  # type: ignore[attr-defined]
                await tg.start(observer.run)  # before any append, so its counts are exact
                await tg.start(manager.run)
                kernel = cls(manager, event_store, files, tg)
                kernel.metrics, kernel.observer = metrics, observer
                kernel.scanner = scanner_client
                metrics.watch_kernel(kernel)
                try:
                    yield kernel
                finally:
                    with anyio.CancelScope(shield=True):
                        await manager.drain(drain_grace_s)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await event_store.close()

    # -- workflows ---------------------------------------------------------------------

    def register_workflow(
        self,
        name: str,
        processor: BaseProcessor,
        *,
        config: WorkflowConfig | None = None,
        watcher: type[BaseWatcher] | None = None,
    ) -> Workflow:
        """Register a workflow and create its folders; its recovery runs in the background.

        `watcher` is a BaseWatcher subclass for this workflow's hot folder (default:
        WatchfilesWatcher); `start_watchers()` starts them.
        """
        workflow = self.manager.add_workflow(name, processor, config=config, watcher=watcher)
        if workflow.config.scan and self.scanner is None:
            log.warning("scan_without_scanner", workflow_name=name,
                        hint="its jobs wait until a scanner is configured (scanner setting)")
        self.files.ensure_layout(name)
        done = self._recovered[name] = anyio.Event()
        self._tg.start_soon(self._recover, workflow, done)
        return workflow

    async def start_watchers(self) -> dict[str, BaseWatcher]:
        """Start a hot-folder watcher for every workflow (the last step of start-up).

        A disabled workflow's watcher still turns files into jobs; they wait until it is
        enabled again.
        """
        for name, workflow in self.manager.workflows.items():
            if name in self.watchers:
                continue
            await self.ready(name)
            factory = workflow.watcher or WatchfilesWatcher
            watcher = factory(name, self.files.data_dir / name / "input", workflow.config,
                              self._watch_submit(name))
            scope = anyio.CancelScope()
            self._watcher_scopes.append(scope)
            await self._tg.start(self._run_watcher, watcher, scope)
            self.watchers[name] = watcher
        return self.watchers

    async def stop_watchers(self) -> None:
        """Stop every watcher (first step of a shutdown: no new jobs from the folders)."""
        for scope in self._watcher_scopes:
            scope.cancel()
        self._watcher_scopes.clear()
        self.watchers.clear()
        await anyio.lowlevel.checkpoint()

    @staticmethod
    async def _run_watcher(watcher: BaseWatcher, scope: anyio.CancelScope, *,
                           task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                           ) -> None:
        with scope:
            await watcher.run(task_status=task_status)

    def _watch_submit(self, workflow_name: str) -> Submit:
        async def submit(name: str, completeness: str, key: str | None) -> str | None:
            if (workflow_name, name) in self._api_owned:
                return None  # the API is creating this file's job right now
            try:
                submitted = await self.submit_file(
                    workflow_name, name, completeness=completeness, idempotency_key=key)
            except FileNotInInput:
                return None  # gone before we got to it
            except (PathOutsideRoot, Rejected) as exc:
                where = await self.files.reject(workflow_name, name, str(exc), utc_now())
                log.warning("file_rejected", workflow_name=workflow_name, name=name,
                            reason=str(exc), moved_to=where)
                return None
            job = submitted.job
            own_file = job.is_active and \
                job.file_path == self.files.input_file_path(workflow_name, name)
            if own_file and not submitted.created and \
                    (job.status is Status.RUNNING or job.attempts > 0 or
                     await anyio.Path(self.files.absolute(layout.processing_path(job))).exists()):
                # The name's job has its file in processing/ (running, waiting for a retry,
                # or moved by a claim that was then refused): this is a new file under that
                # name. It waits for that job to end.
                self._waiting_for[job.id] = (workflow_name, name)
                if len(self._waiting_for) > WAITING_REMEMBERED:  # jobs that ended elsewhere
                    del self._waiting_for[next(iter(self._waiting_for))]
                log.info("file_waits_for_its_names_job", workflow_name=workflow_name,
                         name=name, job_id=job.id)
                return LATER
            if not submitted.created and own_file:
                # The pending job's file, dropped again (replaced, or rewritten): its new
                # bytes go through intake before the job may start.
                self.manager.recheck(job.id)
            elif not submitted.created and key is not None:
                await self._keep_duplicate(job, name, key)  # same bytes as an earlier job
            return job.id

        return submit

    def _settled(self, job: Job) -> None:
        waiting = self._waiting_for.pop(job.id, None)
        if waiting is not None and waiting[0] in self.watchers:
            self.watchers[waiting[0]].notice([waiting[1]], changed=True)

    async def _keep_duplicate(self, job: Job, name: str, key: str) -> None:
        stored = await self.files.keep_duplicate(job, name, utc_now())
        await self.manager.record_duplicate(
            job.id, file_path=f"{job.workflow_name}/input/{name}", stored_path=stored,
            sha256=key.removeprefix("sha256:"))
        log.info("duplicate_received", job_id=job.id, workflow_name=job.workflow_name,
                 name=name, stored_path=stored)

    async def _recover(self, workflow: Workflow, done: anyio.Event) -> None:
        try:
            await self.manager.recover(workflow)
        finally:
            done.set()

    async def ready(self, workflow_name: str | None = None) -> None:
        """Wait until the workflow (or every one registered so far) has recovered."""
        names = [workflow_name] if workflow_name else list(self._recovered)
        for name in names:
            recovered = self._recovered[name]
            if not recovered.is_set():  # (a set event's wait still yields to the loop)
                await recovered.wait()

    # -- jobs --------------------------------------------------------------------------

    async def submit(
        self,
        workflow_name: str,
        file_path: str,
        *,
        priority: int = 0,
        channel_name: str | None = None,
        params: dict[str, Any] | None = None,
        completeness: str = "submitted",
        idempotency_key: str | None = None,
    ) -> Job:
        """Create a job for `data/{workflow}/input/{file_path}`; durable when it returns."""
        return (await self.submit_file(
            workflow_name, file_path, priority=priority, channel_name=channel_name,
            params=params, completeness=completeness, idempotency_key=idempotency_key)).job

    async def submit_file(self, workflow_name: str, file_path: str, **options: Any) -> Submitted:
        """Like `submit`, and say whether the job is new or the file's existing active job."""
        if workflow_name not in self.manager.workflows:
            raise Rejected("not_found", f"no workflow named {workflow_name!r} is registered")
        await self.ready(workflow_name)
        relative = self.input_file(workflow_name, file_path)
        return await self.manager.submit(workflow_name, relative, **options)

    async def submit_upload(
        self, workflow_name: str, filename: str, staged: Path, **options: Any
    ) -> Submitted:
        """Put an uploaded file (streamed to `staged`) into input/ and create its job at once.

        The watcher is told to leave the name alone meanwhile, so the job gets the priority
        and parameters the upload asked for, and never a second job.
        """
        path = await self.check_upload(workflow_name, filename)
        owned = (workflow_name, filename)
        self._api_owned[owned] = self._api_owned.get(owned, 0) + 1
        try:
            try:
                await anyio.to_thread.run_sync(
                    self.files.place_upload, staged, workflow_name, filename)
            except FileExistsError as exc:
                raise Rejected("exists", f"{exc}; upload it under another name") from None
            try:
                submitted = await self.submit_file(workflow_name, filename,
                                                   completeness="upload", **options)
            except Rejected:
                await self._take_back(path)
                raise
            if submitted.created:
                return submitted
            # The file placed has no job: nothing of this upload may stay behind.
            await self._take_back(path)
            key = options.get("idempotency_key")
            if key is not None and submitted.job.idempotency_key == key:
                return submitted  # the same upload, made meanwhile by a retry: its job
            raise Rejected("exists", _still_active(path, submitted.job))
        finally:
            self._api_owned[owned] -= 1
            if not self._api_owned[owned]:
                del self._api_owned[owned]

    async def check_upload(self, workflow_name: str, filename: str) -> str:
        """Refuse an upload before its bytes land: an unknown workflow, a name that is not
        one plain file name, a name whose previous job is still active. Its input path."""
        if workflow_name not in self.manager.workflows:
            raise Rejected("not_found", f"no workflow named {workflow_name!r} is registered")
        self.files.check_upload_name(filename)
        path = self.files.input_file_path(workflow_name, filename)
        active = await self.store.find_active(workflow_name, path)
        if active is not None:
            raise Rejected("exists", _still_active(path, active))
        return path

    async def _take_back(self, path: str) -> None:
        """Remove an upload placed in input/ whose job was not made (still API-owned, so
        no watcher has looked at it)."""
        target = self.files.absolute(path)
        await anyio.to_thread.run_sync(lambda: target.unlink(missing_ok=True))

    def input_file(self, workflow_name: str, file_path: str) -> str:
        """The data-root relative path of a file in input/; refuses escapes and missing files."""
        return self.files.input_file(workflow_name, file_path)

    async def cancel(self, job_id: str, *, actor: str = "api", reason: str = "") -> Job:
        """Cancel a pending or running job."""
        return await self.manager.cancel(job_id, actor=actor, reason=reason)

    async def retry(self, job_id: str, *, actor: str = "api", reason: str = "") -> Job:
        """Send a failed or cancelled job back to the queue."""
        return await self.manager.retry(job_id, actor=actor, reason=reason)

    async def get_job(self, job_id: str) -> Job | None:
        """One job's status."""
        return await self.manager.get_job(job_id)

    async def list_jobs(self, query: JobQuery | None = None, **filters: Any) -> JobPage:
        """A page of jobs, newest first (filters as in JobQuery)."""
        return await self.store.list_jobs(query or JobQuery(**filters))

    async def job_events(self, job_id: str) -> list[StoredEvent]:
        """A job's history, for audits."""
        return await self.store.read_job(job_id)

    async def events(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """The log after a position."""
        return await self.store.read_all(after, limit)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Wait until a job has finished (completed, failed or cancelled)."""
        return await self.manager.wait(job_id, timeout_s)


def _still_active(path: str, job: Job) -> str:
    return (f"{path} still has an active job ({job.id}, {job.status}): upload it again once "
            "that job has finished, or under another name")
