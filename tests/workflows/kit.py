"""Helpers for the bundled workflows' tests: a real Kernel on a temp folder, paced progress."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec

from adapters import Kernel
from kernel.config import WorkflowConfig
from kernel.events import AnyEvent
from kernel.state import Job, Status
from kernel.task import BaseProcessor, BaseTask, JobContext

TEST_SETTINGS: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05,
                                 "progress_interval_s": 0.0}
PACE_S = 0.2  # longer than the manager's progress flush (0.1 s): every report is recorded
JOB_TIMEOUT_S = 120.0


class PacedContext:
    """A JobContext that holds each progress report a moment, so the kernel records it."""

    def __init__(self, inner: JobContext, pace_s: float) -> None:
        self._inner = inner
        self._pace_s = pace_s

    def progress(self, fraction: float, message: str = "") -> None:
        """Report, then wait long enough for the manager's next flush."""
        self._inner.progress(fraction, message)
        time.sleep(self._pace_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Paced(BaseProcessor):
    """A real workflow processor whose progress reports are paced (tests only)."""

    def __init__(self, inner: BaseProcessor, pace_s: float = PACE_S) -> None:
        self.inner = inner
        self.pace_s = pace_s

    def process(self, ctx: JobContext, task: Any) -> Any:
        """Run the real processor with a paced context."""
        return self.inner.process(PacedContext(ctx, self.pace_s), task)

    def validate_file(self, path: Path) -> str | None:
        """The real intake check."""
        return self.inner.validate_file(path)

    def cleanup(self, ctx: JobContext) -> None:
        """The real cleanup."""
        self.inner.cleanup(ctx)

    def parse_task(self, params: dict[str, Any]) -> BaseTask:
        """The real task model."""
        return self.inner.parse_task(params)


@dataclass
class Finished:
    """A finished job, its events (in order) and the data folder."""

    job: Job
    events: list[AnyEvent]
    data_dir: Path

    def kinds(self) -> list[str]:
        """The event class names, in order."""
        return [type(event).__name__ for event in self.events]

    def outputs(self, workflow: str) -> list[str]:
        """Every file left in the workflow's output/ (temporary names included), sorted."""
        folder = self.data_dir / workflow / "output"
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def drop(data_dir: Path, workflow: str, name: str, content: bytes) -> Path:
    """Put a file into the workflow's input/ (subfolders allowed)."""
    path = data_dir / workflow / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def fast_config(module: ModuleType, **changes: Any) -> WorkflowConfig:
    """The workflow's own config with fast retries and unthrottled progress for tests."""
    config: WorkflowConfig = module.config
    return msgspec.structs.replace(config, **{**TEST_SETTINGS, **changes})


async def run_file(data_dir: Path, workflow: str, module: ModuleType, name: str,
                   content: bytes, *, params: dict[str, Any] | None = None,
                   processor: BaseProcessor | None = None,
                   config: WorkflowConfig | None = None) -> Finished:
    """Drop a file, submit it to a fresh Kernel, wait for the end; the job and its events."""
    drop(data_dir, workflow, name, content)
    async with Kernel.open(data_dir=data_dir) as kernel:
        kernel.register_workflow(workflow, processor or Paced(module.processor),
                                 config=config or fast_config(module))
        job = await kernel.submit(workflow, name, params=params)
        done = await kernel.wait(job.id, timeout_s=JOB_TIMEOUT_S)
        events = [stored.event for stored in await kernel.job_events(job.id)]
    return Finished(done, events, data_dir)


async def wait_running_with_progress(kernel: Kernel, job_id: str) -> Job:
    """Wait until the job runs and has reported progress at least once."""
    with anyio.fail_after(JOB_TIMEOUT_S):
        while True:
            job = await kernel.get_job(job_id)
            assert job is not None
            if job.status is Status.RUNNING and job.progress > 0:
                return job
            assert job.is_active, f"the job ended before it could be observed: {job.status}"
            await anyio.sleep(0.02)


async def no_files_left(folder: Path, timeout_s: float = 10.0) -> list[str]:
    """Wait until `folder` holds no file (an abandoned worker thread may take a moment)."""
    left = _files(folder)
    with anyio.move_on_after(timeout_s):
        while left:
            await anyio.sleep(0.05)
            left = _files(folder)
    return left


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())
