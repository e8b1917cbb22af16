"""One attempt of one job: claim its file, run its processor, say how it ended.

This is the job boundary: the only place where any exception a processor raises
is caught and turned into data (an `Outcome`), which the manager records as a
JobFailed event.
"""

from __future__ import annotations

import traceback
from datetime import datetime
from typing import Any

import anyio
import msgspec

from kernel.config import WorkflowConfig
from kernel.decide import CompleteJob
from kernel.ports import Executor, FileChanged, FileMissing, Files
from kernel.state import Job
from kernel.task import BaseProcessor, JobCancelledError, JobError

TRACEBACK_CHARS_MAX = 4000
CLEANUP_TIMEOUT_S = 10.0


class Attempt:
    """A running attempt as the manager tracks it: the job, its stop switch, its progress."""

    __slots__ = ("finishing", "job", "last_flush_s", "latest", "scope", "sent", "stop_reason")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.scope: anyio.CancelScope | None = None
        self.stop_reason: str | None = None  # "cancel", "shutdown" or "timeout"
        self.latest: tuple[float, str] | None = None
        self.sent: tuple[float, str] | None = None
        self.last_flush_s = float("-inf")
        self.finishing = False

    def stop(self, reason: str) -> None:
        """Ask the processor to stop (a cancel request or shutdown); idempotent."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.scope is not None:
            self.scope.cancel()

    def is_stopping(self) -> bool:
        """True once the attempt was asked to stop (what `ctx.cancelled` reads)."""
        return self.stop_reason is not None

    def report(self, fraction: float, message: str = "") -> None:
        """The processor's progress callback: keeps only the latest value (thread-safe)."""
        self.latest = (float(fraction), str(message))

    def progress_due(self, now_s: float, interval_s: float) -> bool:
        """Whether new progress waits and the job's interval has passed."""
        return (
            not self.finishing
            and self.latest is not None
            and self.latest != self.sent
            and now_s - self.last_flush_s >= interval_s
        )

    def take_progress(self, now_s: float) -> tuple[float, str]:
        """Mark the latest progress as sent and return it."""
        latest = self.latest
        assert latest is not None
        self.sent, self.last_flush_s = latest, now_s
        return latest


class Outcome(msgspec.Struct, kw_only=True):
    """How an attempt ended: a result, an error, or a cancellation."""

    result: dict[str, Any] = msgspec.field(default_factory=dict)
    output_paths: list[str] = msgspec.field(default_factory=list)
    error_type: str | None = None
    message: str = ""
    traceback: str = ""
    retryable: bool = True
    cancelled: bool = False

    def completion(self, job: Job, at: datetime) -> CompleteJob:
        """The command that records this successful outcome."""
        return CompleteJob(job_id=job.id, at=at, attempt=job.attempts,
                           result=self.result, output_paths=self.output_paths)


async def run_attempt(
    attempt: Attempt,
    processor: BaseProcessor,
    config: WorkflowConfig,
    files: Files,
    executor: Executor,
) -> Outcome:
    """Claim the file and run the processor; never raises for the processor's failures."""
    job = attempt.job
    try:
        await files.claim(job)
    except FileMissing as exc:
        return Outcome(error_type="FileMissing", message=str(exc), retryable=False)
    except FileChanged as exc:
        return Outcome(error_type="FileChanged", message=str(exc), retryable=False)
    except OSError as exc:
        return Outcome(error_type="FileError", message=f"cannot move the file: {exc}")
    try:
        task = processor.parse_task(job.params)
    except msgspec.ValidationError as exc:
        return Outcome(error_type="ValidationError", message=str(exc), retryable=False)
    ctx = files.context(job, config, attempt.report, attempt.is_stopping)
    outcome = await _call(attempt, processor, config, executor, ctx, task)
    if outcome.error_type is not None or outcome.cancelled:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            await executor.cleanup(processor, ctx)
    return outcome


async def _call(attempt: Attempt, processor: BaseProcessor, config: WorkflowConfig,
                executor: Executor, ctx: Any, task: Any) -> Outcome:
    try:
        with anyio.CancelScope() as scope:
            attempt.scope = scope
            if config.timeout_s is not None:
                scope.deadline = anyio.current_time() + config.timeout_s
            if attempt.stop_reason is not None:
                scope.cancel()
            result = await executor.run(processor, ctx, task, config.runner)
            if not isinstance(result, dict):
                return Outcome(error_type="InvalidResult", retryable=False,
                               message=f"process() returned {type(result).__name__}, not dict")
            return Outcome(result=result, output_paths=list(ctx.output_paths))
    except JobCancelledError:
        pass
    except JobError as exc:
        return Outcome(error_type=_text(exc.error_type), message=_text(exc.message),
                       traceback=_excerpt(exc), retryable=exc.retryable)
    except (Exception, SystemExit) as exc:  # the job boundary: a failure becomes an event
        # SystemExit too: a processor's `sys.exit` (argparse refusing an option, a CLI
        # helper) ends its job, not the server (which would then retry it on every start).
        return Outcome(error_type=type(exc).__name__, message=_text(str(exc) or repr(exc)),
                       traceback=_excerpt(exc))
    finally:
        attempt.scope = None
    return _stopped(attempt, config)


def _stopped(attempt: Attempt, config: WorkflowConfig) -> Outcome:
    if attempt.stop_reason is None:
        attempt.stop_reason = "timeout"  # ctx.cancelled turns true for an abandoned thread
    if attempt.stop_reason == "cancel":
        return Outcome(cancelled=True)
    if attempt.stop_reason == "shutdown":
        return Outcome(error_type="Interrupted",
                       message="the server shut down before the job finished")
    return Outcome(error_type="Timeout",
                   message=f"the job ran longer than its timeout of {config.timeout_s} s")


def _excerpt(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return _text(text[-TRACEBACK_CHARS_MAX:])


def _text(text: str) -> str:
    # A message can hold undecodable bytes (a file name read with surrogateescape); the log
    # stores UTF-8, so those are shown as escapes rather than refused.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
