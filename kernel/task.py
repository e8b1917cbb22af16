"""What a workflow implements: its task model (`BaseTask`) and its `BaseProcessor`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

import msgspec

from kernel.state import Job


class BaseTask(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A workflow's parameters for one job; subclass it and add typed fields with defaults."""


class JobError(Exception):
    """Raise from a processor to fail the attempt with your own error type.

    `retryable=False` makes the failure final at once, whatever the attempts left.
    """

    def __init__(self, error_type: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its keyword, so it survives the trip back from a worker process.
        return (_job_error, (self.error_type, self.message, self.retryable))


def _job_error(error_type: str, message: str, retryable: bool) -> JobError:
    return JobError(error_type, message, retryable=retryable)


class JobCancelledError(Exception):
    """Raised by `ctx.check_cancelled()` once a cancel request or timeout reached the job."""


class JobContext(Protocol):
    """The processor's view of its job (built by the shell's Files adapter)."""

    @property
    def job(self) -> Job:
        """The job as it was when this attempt started."""
        ...

    @property
    def input_path(self) -> Path:
        """The input file, in `processing/` while the attempt runs."""
        ...

    @property
    def output_dir(self) -> Path:
        """The workflow's `output/` folder."""
        ...

    @property
    def log(self) -> Any:
        """A logger bound to job_id, workflow_name and attempt."""
        ...

    @property
    def output_paths(self) -> list[str]:
        """The outputs written so far, relative to the data root."""
        ...

    def open_output(self, name: str, mode: str = "wb") -> AbstractContextManager[IO[Any]]:
        """Write `output/{name}` atomically: temporary name, fsync, rename on success only."""
        ...

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the job is (0..1); cheap, safe from any thread, throttled."""
        ...

    @property
    def cancelled(self) -> bool:
        """True once a cancel request or the timeout reached this attempt."""
        ...

    def check_cancelled(self) -> None:
        """Raise JobCancelledError if the attempt was cancelled; call it between chunks."""
        ...


class BaseProcessor:
    """A workflow's logic: `process(ctx, task) -> dict`, async or plain.

    An `async def process` runs on the event loop and must not block; a plain `def`
    runs in a worker thread or a worker process (the workflow's `runner` setting).
    The returned dict is the job's result; files written with `ctx.open_output` are
    its outputs.
    """

    Task: ClassVar[type[BaseTask]] = BaseTask

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Do the work of one job."""
        raise NotImplementedError(f"{type(self).__name__} must implement process(ctx, task)")

    def validate_file(self, path: Path) -> str | None:
        """Extra intake check on the input file: a reason to refuse it, or None to accept."""
        return None

    def cleanup(self, ctx: JobContext) -> None:
        """Called after an attempt that failed, timed out or was cancelled."""
        return None

    @property
    def is_async(self) -> bool:
        """Whether `process` is a coroutine function (runs on the event loop)."""
        return inspect.iscoroutinefunction(self.process)

    def parse_task(self, params: dict[str, Any]) -> BaseTask:
        """Validate a job's params into this workflow's task model (raises msgspec errors)."""
        return msgspec.convert(params, type=self.Task)
