"""Alerts: rules checked every few seconds; each fires once when it starts holding and once
when it clears, is recorded (GET /api/alerts), and is sent to the rule's webhook targets."""

from __future__ import annotations

import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import msgspec
import structlog

from adapters.notify.records import AlertRecord, NotificationStore
from adapters.notify.settings import AlertRule, WebhookTarget
from adapters.notify.webhooks import SendFailed, send_signed
from kernel.events import JobFailed
from kernel.ports import StoreError
from kernel.state import StoredEvent

if TYPE_CHECKING:
    from adapters.bootstrap import Kernel

log = structlog.get_logger("multiflow.alerts")
CHECK_INTERVAL_S = 2.0
ALERT_SEND_ATTEMPTS = 3
_json = msgspec.json.Encoder()


class AlertMessage(msgspec.Struct, frozen=True, kw_only=True):
    """What a target receives when an alert fires or clears."""

    alert: str
    kind: str
    state: str
    workflow: str | None
    detail: str
    at: datetime


class AlertEngine:
    """Evaluates every rule against the running kernel and the log's recent failures."""

    def __init__(self, kernel: Kernel, rules: list[AlertRule], targets: list[WebhookTarget],
                 records: NotificationStore) -> None:
        self.kernel = kernel
        self.rules = rules
        self.targets = {t.name: t for t in targets}
        self.records = records
        self.firing: dict[str, bool] = {rule.name: False for rule in rules}
        self._failures: deque[tuple[float, str]] = deque(maxlen=100_000)
        self._deep_since: dict[str, float] = {}
        self._restored = False
        self._checking = anyio.Lock()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Follow final failures from now on, and check the rules every few seconds."""
        position = await self.kernel.store.last_seq()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_failures, position)
            task_status.started()
            while True:
                try:
                    await self.check()
                except StoreError as exc:  # a full or lost store: try again next round
                    log.warning("alert_check_failed", error=str(exc))
                await anyio.sleep(CHECK_INTERVAL_S)

    async def _restore(self) -> None:
        """Each rule starts as its last record left it, so one that fired can clear."""
        for record in reversed(await self.records.list_alerts(10_000)):
            if record.rule in self.firing:
                self.firing[record.rule] = record.state == "fired"
        self._restored = True

    async def _follow_failures(self, position: int) -> None:
        while True:
            try:
                async for stored in self.kernel.store.tail(position):
                    await self.note(stored)
                    position = stored.seq
            except StoreError:
                await anyio.sleep(1.0)

    async def note(self, stored: StoredEvent) -> None:
        """Count a final failure for the failure-rate rules."""
        if isinstance(stored.event, JobFailed) and stored.event.retry_at is None:
            job = await self.kernel.store.get_job(stored.job_id)
            workflow = job.workflow_name if job is not None else ""
            self._failures.append((time.monotonic(), workflow))

    async def check(self) -> None:
        """Evaluate every rule; send and record the ones whose state changed."""
        async with self._checking:  # the loop and a caller must not announce twice
            await self._check()

    async def _check(self) -> None:
        if not self._restored:
            await self._restore()
        for rule in self.rules:
            holds, detail = self.evaluate(rule)
            if holds != self.firing[rule.name]:
                await self._announce(rule, "fired" if holds else "cleared", detail)
                self.firing[rule.name] = holds  # only once it is recorded

    def evaluate(self, rule: AlertRule) -> tuple[bool, str]:
        """Whether the rule holds now, and a sentence saying why."""
        match rule.kind:
            case "failures":
                return self._failures_hold(rule)
            case "queue_depth":
                return self._depth_holds(rule)
            case "running_too_long":
                return self._overdue(rule)
            case "watcher_stale":
                return self._stale(rule)
        return False, ""

    def _failures_hold(self, rule: AlertRule) -> tuple[bool, str]:
        horizon = time.monotonic() - rule.window_s
        count = sum(1 for at, workflow in self._failures
                    if at >= horizon and rule.workflow in (None, workflow))
        return count > rule.threshold, \
            f"{count} final failures in the last {rule.window_s:.0f} s"

    def _depth_holds(self, rule: AlertRule) -> tuple[bool, str]:
        depth = sum(1 for job in self.kernel.manager.queue.jobs()
                    if rule.workflow in (None, job.workflow_name))
        now = time.monotonic()
        if depth <= rule.threshold:
            self._deep_since.pop(rule.name, None)
            return False, f"{depth} jobs waiting"
        since = self._deep_since.setdefault(rule.name, now)
        return now - since >= rule.window_s, \
            f"{depth} jobs waiting for {now - since:.0f} s"

    def _overdue(self, rule: AlertRule) -> tuple[bool, str]:
        now = datetime.now(UTC)
        late = []
        for job in self.kernel.manager.running_jobs():
            workflow = self.kernel.manager.workflows.get(job.workflow_name)
            if workflow is None or rule.workflow not in (None, job.workflow_name):
                continue
            limit_s = (workflow.config.timeout_s or float("inf")) + rule.threshold
            if job.started_at and (now - job.started_at).total_seconds() > limit_s:
                late.append(job.id)
        return bool(late), f"running past their timeout: {', '.join(late) or 'none'}"

    def _stale(self, rule: AlertRule) -> tuple[bool, str]:
        stale = [f"{name} ({watcher.heartbeat_age_s():.0f} s)"
                 for name, watcher in self.kernel.watchers.items()
                 if rule.workflow in (None, name) and watcher.heartbeat_age_s() > rule.threshold]
        return bool(stale), f"stale watchers: {', '.join(stale) or 'none'}"

    async def _announce(self, rule: AlertRule, state: str, detail: str) -> None:
        at = datetime.now(UTC)
        log.warning("alert_" + state, alert=rule.name, kind=rule.kind, workflow_name=rule.workflow,
                    detail=detail)
        await self.records.record_alert(AlertRecord(rule=rule.name, state=state, at=at,
                                                    detail=detail))
        message = _json.encode(AlertMessage(alert=rule.name, kind=rule.kind, state=state,
                                            workflow=rule.workflow, detail=detail, at=at))
        for name in rule.targets:
            target = self.targets.get(name)
            if target is not None:
                self.kernel._tg.start_soon(self._send, target, message,
                                           f"alert-{rule.name}-{state}-{int(at.timestamp())}")

    async def _send(self, target: WebhookTarget, message: bytes, key: str) -> None:
        for attempt in range(1, ALERT_SEND_ATTEMPTS + 1):
            try:
                await send_signed(target, message, "alert", key)
                return
            except (SendFailed, TimeoutError) as exc:
                log.warning("alert_send_failed", target=target.name, attempt=attempt,
                            error=str(exc))
                await anyio.sleep(target.backoff_base_s * 2 ** (attempt - 1))
