"""What the notifier keeps beside the log: checkpoints, dead letters, fired alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import msgspec


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery that never succeeded: which event, to which target, and why."""

    id: int = 0
    target: str
    seq: int
    job_id: str
    event_type: str
    attempts: int
    last_error: str
    created_at: datetime


class AlertRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An alert rule that started (`fired`) or stopped (`cleared`) holding."""

    id: int = 0
    rule: str
    state: str  # "fired" or "cleared"
    at: datetime
    detail: str


class NotificationStore(Protocol):
    """Durable notifier state; the SQLite and memory event stores provide it."""

    async def get_checkpoint(self, name: str) -> int | None:
        """The seq a consumer has handled up to (None if it never ran)."""
        ...

    async def set_checkpoint(self, name: str, seq: int) -> None:
        """Record that the consumer `name` has handled every event up to `seq`."""
        ...

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """Keep a delivery that exhausted its attempts (once per target and seq)."""
        ...

    async def list_dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]:
        """The dead letters with ids past `after_id`, oldest first."""
        ...

    async def remove_dead_letter(self, letter_id: int) -> None:
        """Forget a dead letter (it was redelivered)."""
        ...

    async def record_alert(self, record: AlertRecord) -> None:
        """Keep an alert that fired or cleared."""
        ...

    async def list_alerts(self, limit: int = 100) -> list[AlertRecord]:
        """The alerts, newest first."""
        ...
