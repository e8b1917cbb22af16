"""Per-workflow settings and the retry policy, as pure data and pure functions."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

import msgspec

# Errors where another attempt cannot help: the same bytes fail the same way.
DEFAULT_NON_RETRYABLE = (
    "TooLarge",
    "TypeNotAllowed",
    "Truncated",
    "Infected",
    "ValidationError",
    "FileMissing",
    "FileChanged",
)


MAX_ATTEMPTS_LIMIT = 1000


class WorkflowConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every per-workflow setting; set in a workflow's config.py, overridable in multiflow.toml."""

    enabled: bool = True
    concurrency: int | None = None  # at most this many running; None: the global limit only
    timeout_s: float | None = 3600.0
    max_attempts: int = 3
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    backoff_jitter: float = 0.2  # +- this fraction of the delay
    non_retryable: tuple[str, ...] = DEFAULT_NON_RETRYABLE
    settle_ms: int = 500  # size and mtime stable this long before a file becomes a job
    marker: bool = False  # wait for `x.done` beside `x` instead of settling
    watch_mode: Literal["events", "poll"] = "events"  # poll: network shares without inotify
    poll_interval_s: float = 1.0
    rescan_interval_s: float = 30.0  # a full scan of input/ catches missed notifications
    include: tuple[str, ...] = ()  # glob patterns; empty: every name
    exclude: tuple[str, ...] = ()
    max_size_bytes: int | None = 1024**3
    allowed_types: tuple[str, ...] = ()  # extensions (".png") or MIME types; empty: any
    check_complete: bool = True  # structural trailer checks (PNG IEND, PDF %%EOF, ...)
    dedupe: bool = False  # a re-dropped identical file (sha256) is not processed again
    scan: bool = False  # ClamAV scan at intake
    runner: Literal["thread", "process"] = "thread"  # for a plain `def` processor
    progress_interval_s: float = 0.5  # at most one JobProgress per job this often

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be within 1..{MAX_ATTEMPTS_LIMIT}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff must not be negative")
        if not 0 <= self.backoff_jitter <= 1:
            raise ValueError("backoff_jitter must be within 0..1")
        if self.settle_ms < 0:
            raise ValueError("settle_ms must not be negative")
        if self.max_size_bytes is not None and self.max_size_bytes < 1:
            raise ValueError("max_size_bytes must be positive")
        if self.poll_interval_s <= 0 or self.rescan_interval_s <= 0:
            raise ValueError("poll_interval_s and rescan_interval_s must be positive")
        if self.progress_interval_s < 0:
            raise ValueError("progress_interval_s must not be negative")


def retry_at(
    config: WorkflowConfig, attempt: int, error_type: str, at: datetime, jitter_sample: float
) -> datetime | None:
    """When attempt `attempt` that failed at `at` runs again, or None when it is final.

    `jitter_sample` is a number in [0, 1) drawn by the shell, so the policy stays pure:
    the delay is `base * 2**(attempt-1)`, capped, then spread by +-`backoff_jitter`.
    """
    if error_type in config.non_retryable or attempt >= config.max_attempts:
        return None
    doublings = min(max(0, attempt - 1), 64)  # past 2**64 the cap has long applied
    delay_s = min(config.backoff_max_s, config.backoff_base_s * 2.0**doublings)
    spread = 1.0 + config.backoff_jitter * (2.0 * jitter_sample - 1.0)
    return at + timedelta(seconds=max(0.0, delay_s * spread))
