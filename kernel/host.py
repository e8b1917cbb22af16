"""What the JobManager's parts share: its registered workflows and the state its duties use.

`ManagerHost` is the part of `JobManager` that its mixins (kernel/intake.py,
kernel/nodes.py) rely on; they type `self` with it, so each module says exactly
what it touches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import msgspec

from kernel.attempt import Attempt
from kernel.config import WorkflowConfig
from kernel.ports import Clock, Cluster, Entropy, EventStore, Files
from kernel.queue import JobQueue
from kernel.state import Job, StoredEvent
from kernel.task import BaseProcessor

SCANNER_RETRY_S = 5.0
STORE_RETRY_MAX_S = 5.0


class Workflow(msgspec.Struct, frozen=True, kw_only=True):
    """A registered workflow: its processor, its settings and (for the shell) its watcher."""

    name: str
    processor: BaseProcessor
    config: WorkflowConfig
    watcher: Any = None


class Submitted(msgspec.Struct, frozen=True):
    """What `submit` returns: the job, and whether this call created it."""

    job: Job
    created: bool


class ManagerHost(Protocol):
    """The JobManager as its duties see it."""

    store: EventStore
    files: Files
    clock: Clock
    entropy: Entropy
    workflows: dict[str, Workflow]
    queue: JobQueue
    cluster: Cluster | None
    lease_s: float
    heartbeat_s: float
    _jobs: dict[str, Job]
    _running: dict[str, Attempt]
    _intake: deque[str]
    _intake_ready: anyio.Event
    _unsure_claims: dict[str, int]
    _lease_ok: bool
    _lease_renewed: anyio.Event
    _peers: int
    _cluster_full_until: float

    def _wake(self) -> None: ...
    def _admit(self, job: Job) -> None: ...
    def _done_here(self, job_id: str) -> None: ...
    def _tg_start(self, func: Any, *args: Any) -> None: ...
    def _apply(self, job: Job | None, stored: Sequence[StoredEvent]) -> Job: ...
    def _interval(self, attempt: Attempt) -> float: ...
    def _follow_job(self, known: Job | None, job: Job | None) -> None: ...
    async def _fresh_job(self, job_id: str) -> Job | None: ...
    async def _settle(self, job: Job | None) -> None: ...
    async def _settle_file(self, job: Job) -> None: ...
    async def _decide_and_append(self, job_id: str, make: Any) -> Job: ...
    async def _check_intake(self, job: Job) -> None: ...
    async def _readmit_later(self, job_id: str, delay_s: float) -> None: ...
    async def _orphans(self, running: list[Job]) -> list[Job]: ...
    async def _resolve_unsure_claims(self, cluster: Cluster, running: set[str]) -> None: ...
    async def _interrupt(self, job: Job, config: WorkflowConfig) -> Job: ...
    async def _recover_orphans(self, cluster: Cluster) -> None: ...
    async def _foreign(self, stored: StoredEvent) -> None: ...
