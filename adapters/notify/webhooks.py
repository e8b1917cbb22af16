"""Webhooks: each target is a consumer of the log with its own durable checkpoint.

A target reads the log in seq order from its checkpoint, sends every matching
event (signed, with the job as it was at that event), retries 5xx answers and
timeouts with backoff, puts a delivery that never succeeds on the dead-letter
list, and advances its checkpoint only after that. After a crash it resumes at
its checkpoint: every matching event is delivered at least once, none is
skipped, and a repeat carries the same `X-Multiflow-Delivery` key. Targets run
on their own tasks and their HTTP calls in threads: a slow or dead receiver
never slows job processing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import socket
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog

from adapters.config import masked_url
from adapters.http.schemas import EventOut, JobOut, event_out
from adapters.notify.records import DeadLetter, NotificationStore
from adapters.notify.settings import EventKind, WebhookTarget
from kernel.events import JobCancelled, JobCompleted, JobFailed, JobRetried
from kernel.ports import EventStore, StoreError
from kernel.state import Job, StoredEvent, apply

log = structlog.get_logger("multiflow.notify")
CHECKPOINT_EVERY = 500  # events a target skips between checkpoint writes, at most
_json = msgspec.json.Encoder()


def kind_of(stored: StoredEvent) -> EventKind | None:
    """The notification kind of an event, or None for events no target hears about."""
    match stored.event:
        case JobCompleted():
            return "completed"
        case JobFailed(retry_at=None):
            return "failed"
        case JobCancelled():
            return "cancelled"
        case JobRetried():
            return "retried"
    return None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over `{timestamp}.{body}`, hex."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON a receiver gets."""

    delivery_id: str
    target: str
    event: EventOut
    job: JobOut


class SendFailed(Exception):
    """One attempt did not succeed; `retryable` says whether another may."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def connect(target: WebhookTarget) -> http.client.HTTPConnection:
    """A connection to the target (not yet open); SendFailed for a URL that cannot work."""
    parts = urllib.parse.urlsplit(target.url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        # The host alone: `user:pass@` of the URL goes in an Authorization header, never
        # into a name to resolve.
        return kind(parts.hostname or "", parts.port, timeout=target.timeout_s)
    except (ValueError, http.client.HTTPException) as exc:
        raise SendFailed(f"bad url {masked_url(target.url)!r}: {exc}",
                         retryable=False) from exc


def basic_auth(url: str) -> dict[str, str]:
    """The Authorization header of a URL's `user:password@`, if it has one."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return {}
    pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}


def post(conn: http.client.HTTPConnection, target: WebhookTarget, body: bytes,
         headers: dict[str, str]) -> int:
    """One signed POST (in a worker thread); returns the status or raises SendFailed."""
    parts = urllib.parse.urlsplit(target.url)
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise SendFailed(f"{type(exc).__name__}: {exc}", retryable=True) from exc
    finally:
        conn.close()
    if 200 <= response.status < 300:
        return response.status
    retryable = response.status >= 500 or response.status in (408, 429)
    raise SendFailed(f"HTTP {response.status}", retryable=retryable)


# Webhook calls get threads of their own: hanging receivers must never take the threads
# that file moves and processors use.
_SENDERS = anyio.CapacityLimiter(16)


async def send_signed(target: WebhookTarget, body: bytes, event_type: str, key: str) -> None:
    """One attempt of one delivery, off the event loop; raises SendFailed."""
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "multiflow-webhook/1",
               "X-Multiflow-Event": event_type, "X-Multiflow-Delivery": key,
               "X-Multiflow-Timestamp": timestamp,
               "X-Multiflow-Signature": sign(target.secret, timestamp, body),
               **basic_auth(target.url)}
    conn = connect(target)
    try:
        # The socket timeout bounds every read and write; the outer bound covers the rest.
        with anyio.fail_after(target.timeout_s * 3 + 5):
            await anyio.to_thread.run_sync(post, conn, target, body, headers,
                                           abandon_on_cancel=True, limiter=_SENDERS)
    finally:
        _abort(conn)  # on cancel too: the abandoned thread's blocked socket call returns


def _abort(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread
    conn.close()


class WebhookConsumer:
    """One target's consumer of the log (see the module docstring)."""

    def __init__(self, target: WebhookTarget, store: EventStore,
                 records: NotificationStore) -> None:
        self.target = target
        self.store = store
        self.records = records
        self.checkpoint_name = f"webhook:{target.name}"
        self.delivered = 0
        self.position = 0  # the last event handled, delivered or not

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Deliver from the checkpoint on, for ever (restarting after store errors)."""
        started = False
        while True:
            try:
                saved = await self.records.get_checkpoint(self.checkpoint_name)
                if saved is None:
                    # A target new to this log starts with what happens from now on, not
                    # with the whole history: its checkpoint is the head.
                    saved = await self.store.last_seq()
                    await self.records.set_checkpoint(self.checkpoint_name, saved)
                    log.info("webhook_starts_at_head", target=self.target.name, seq=saved)
                self.position = max(self.position, saved)  # never go back within one life
                if not started:
                    started = True
                    task_status.started()
                await self._follow()
            except StoreError as exc:
                log.warning("webhook_store_error", target=self.target.name, error=str(exc))
                await anyio.sleep(1.0)

    async def _follow(self) -> None:
        # The checkpoint follows every delivery (a crash repeats at most the one in flight)
        # and every CHECKPOINT_EVERY events skipped, and is written once more on stopping.
        unsaved = 0
        try:
            async for stored in self.store.tail(self.position):
                delivered = await self.handle(stored)
                self.position = stored.seq
                unsaved += 1
                if delivered or unsaved >= CHECKPOINT_EVERY:
                    await self.records.set_checkpoint(self.checkpoint_name, stored.seq)
                    unsaved = 0
        finally:
            if unsaved:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0), \
                        contextlib.suppress(StoreError):
                    await self.records.set_checkpoint(self.checkpoint_name, self.position)

    async def handle(self, stored: StoredEvent) -> bool:
        """Deliver one event if this target wants it; True when something was sent or kept."""
        kind = kind_of(stored)
        if kind is None or kind not in self.target.events:
            return False
        job = await self._job_at(stored)
        if not self._wants(job):
            return False
        await self._deliver(stored, job)
        return True

    def _wants(self, job: Job) -> bool:
        target = self.target
        if target.workflows and job.workflow_name not in target.workflows:
            return False
        return not target.channels or job.channel_name in target.channels

    async def _job_at(self, stored: StoredEvent) -> Job:
        job: Job | None = None
        for earlier in await self.store.read_job(stored.job_id):
            if earlier.seq > stored.seq:
                break
            job = apply(job, earlier)
        assert job is not None
        return job

    def body(self, stored: StoredEvent, job: Job) -> tuple[bytes, str]:
        """The delivery's JSON and its idempotency key (the event's seq and the target)."""
        key = f"{stored.seq}-{self.target.name}"
        delivery = Delivery(delivery_id=key, target=self.target.name, event=event_out(stored),
                            job=JobOut.of(job))
        return _json.encode(delivery), key

    async def _deliver(self, stored: StoredEvent, job: Job) -> None:
        body, key = self.body(stored, job)
        event_type = event_out(stored).type
        error = ""
        for attempt in range(1, self.target.max_attempts + 1):
            try:
                await send_signed(self.target, body, event_type, key)
                self.delivered += 1
                return
            except (SendFailed, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
                retryable = getattr(exc, "retryable", True)
                log.warning("webhook_attempt_failed", target=self.target.name, seq=stored.seq,
                            attempt=attempt, error=error)
                if not retryable or attempt == self.target.max_attempts:
                    break
                await anyio.sleep(min(self.target.backoff_max_s,
                                      self.target.backoff_base_s * 2 ** (attempt - 1)))
        await self.records.add_dead_letter(DeadLetter(
            target=self.target.name, seq=stored.seq, job_id=stored.job_id,
            event_type=event_type, attempts=attempt, last_error=error,
            created_at=datetime.now(UTC)))
        log.error("webhook_dead_letter", target=self.target.name, seq=stored.seq,
                  job_id=stored.job_id, error=error)


async def redeliver(letter: DeadLetter, target: WebhookTarget, store: EventStore,
                    records: NotificationStore) -> None:
    """Send a dead letter again, once; on success it leaves the list. Raises SendFailed."""
    events = [e for e in await store.read_job(letter.job_id) if e.seq == letter.seq]
    if not events:
        raise SendFailed(f"event {letter.seq} is not in the log", retryable=False)
    consumer = WebhookConsumer(target, store, records)
    job = await consumer._job_at(events[0])
    body, key = consumer.body(events[0], job)
    await send_signed(target, body, event_out(events[0]).type, key)
    await records.remove_dead_letter(letter.id)


def describe(target: WebhookTarget) -> dict[str, Any]:
    """A target without its secret, for logs and the API."""
    data: dict[str, Any] = msgspec.to_builtins(target)
    data["secret"] = "****"
    data["url"] = masked_url(target.url)
    return data
