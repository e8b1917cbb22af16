"""The notification settings: `[[webhooks]]` and `[[alerts]]` in multiflow.toml."""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Literal

import msgspec

EventKind = Literal["completed", "failed", "cancelled", "retried"]


class WebhookTarget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where to send which news: `[[webhooks]]` in multiflow.toml."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    url: str
    secret: str
    channels: list[str] = msgspec.field(default_factory=list)  # empty: every channel
    workflows: list[str] = msgspec.field(default_factory=list)  # empty: every workflow
    events: list[EventKind] = msgspec.field(
        default_factory=lambda: ["completed", "failed", "cancelled", "retried"])
    timeout_s: float = 5.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        try:
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            raise ValueError(f"webhook {self.name}: url has an invalid port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook {self.name}: url must be http(s)://host[:port]/path")
        if not self.secret:
            raise ValueError(f"webhook {self.name}: a secret is required to sign deliveries")
        if self.timeout_s <= 0:
            raise ValueError(f"webhook {self.name}: timeout_s must be positive")


class AlertRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[[alerts]]` in multiflow.toml.

    kind "failures": more than `threshold` final failures within `window_s`;
    "queue_depth": more than `threshold` jobs waiting, for `window_s` on end;
    "running_too_long": a job running longer than its timeout plus `threshold` seconds;
    "watcher_stale": a watcher's heartbeat older than `threshold` seconds.
    """

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    kind: Literal["failures", "queue_depth", "running_too_long", "watcher_stale"]
    workflow: str | None = None  # None: every workflow
    threshold: float = 0
    window_s: float = 600.0
    targets: list[str] = msgspec.field(default_factory=list)
