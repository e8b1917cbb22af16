"""What the HTTP app needs from the running process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from adapters.bootstrap import Kernel
from adapters.config import Settings


@dataclass
class AppState:
    """The kernel, the settings, and the process's own flags (draining, problems)."""

    kernel: Kernel
    settings: Settings
    tokens: list[str]
    workflow_problems: dict[str, str] = field(default_factory=dict)
    draining: bool = False
    shutdown: anyio.Event = field(default_factory=anyio.Event)
    started_s: float = field(default_factory=time.monotonic)
    scanner_ping: Callable[[], Awaitable[bool]] | None = None
    alerts: Any = None  # the AlertEngine, when alert rules are configured
    store_probe: tuple[float, Any] | None = None  # /readyz's last write probe: (when, Check)
    starting: bool = False  # set by `multiflow run` until its watchers are started
