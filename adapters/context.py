"""The processor's view of its job (`kernel.task.JobContext`), on real folders."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog

from adapters.fsutil import atomic_write, write_bytes_atomic
from kernel.state import Job
from kernel.task import JobCancelledError


class FileJobContext:
    """Input in processing/, atomic outputs in output/, progress and cancellation."""

    def __init__(
        self,
        job: Job,
        data_dir: Path,
        input_path: Path,
        progress: Callable[[float, str], None],
        cancelled: Callable[[], bool],
    ) -> None:
        self._job = job
        self._data_dir = data_dir
        self._input_path = input_path
        self._progress = progress
        self._cancelled = cancelled
        self._outputs: list[str] = []

    @property
    def job(self) -> Job:
        """The job as it was when this attempt started."""
        return self._job

    @property
    def input_path(self) -> Path:
        """The input file, in processing/."""
        return self._input_path

    @property
    def output_dir(self) -> Path:
        """The workflow's output/ folder."""
        return self._data_dir / self._job.workflow_name / "output"

    @property
    def output_paths(self) -> list[str]:
        """Outputs written so far, relative to the data root."""
        return list(self._outputs)

    @property
    def log(self) -> Any:
        """A structlog logger bound to this job."""
        return structlog.get_logger("multiflow.job").bind(
            job_id=self._job.id, workflow_name=self._job.workflow_name,
            attempt=self._job.attempts)

    @contextlib.contextmanager
    def open_output(self, name: str, mode: str = "wb") -> Iterator[IO[Any]]:
        """Write output/{name} atomically; it appears only if the block succeeds."""
        target = self._output_target(name)
        with atomic_write(target, mode) as handle:
            yield handle
        self._outputs.append(target.relative_to(self._data_dir).as_posix())

    def adopt_outputs(self, paths: list[str]) -> None:
        """Record outputs that a worker process wrote for this attempt."""
        self._outputs.extend(paths)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1); only the latest value is kept between flushes."""
        self._progress(fraction, message)

    @property
    def cancelled(self) -> bool:
        """True once a cancel request, shutdown or timeout reached this attempt."""
        return self._cancelled()

    def check_cancelled(self) -> None:
        """Raise JobCancelledError if this attempt should stop."""
        if self._cancelled():
            raise JobCancelledError(f"job {self._job.id} was stopped")

    def _output_target(self, name: str) -> Path:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or "\x00" in name or not name:
            raise ValueError(f"output name {name!r} must be a plain relative name")
        return self.output_dir / relative

    def detached(self, progress_file: Path) -> DetachedContext:
        """A picklable copy for a worker process: progress goes through a small file."""
        return DetachedContext(self._job, self._data_dir, self._input_path, progress_file)


class _Progress(msgspec.Struct):
    fraction: float
    message: str


class DetachedContext(FileJobContext):
    """The context a worker process gets: picklable; progress lands in a file the parent polls."""

    PROGRESS_WRITE_INTERVAL_S = 0.2

    def __init__(self, job: Job, data_dir: Path, input_path: Path, progress_file: Path) -> None:
        super().__init__(job, data_dir, input_path, self._write_progress, lambda: False)
        self.progress_file = progress_file
        self._last_write_s = 0.0
        self._pending: _Progress | None = None

    def _write_progress(self, fraction: float, message: str) -> None:
        self._pending = _Progress(fraction, message)
        now_s = time.monotonic()
        if now_s - self._last_write_s >= self.PROGRESS_WRITE_INTERVAL_S:
            self.flush_progress()

    def flush_progress(self) -> None:
        """Write the latest progress for the parent to read."""
        if self._pending is not None:
            write_bytes_atomic(self.progress_file, msgspec.json.encode(self._pending))
            self._last_write_s, self._pending = time.monotonic(), None

    def __getstate__(self) -> dict[str, Any]:
        return {"job": msgspec.json.encode(self._job), "data_dir": str(self._data_dir),
                "input_path": str(self._input_path), "outputs": self._outputs,
                "progress_file": str(self.progress_file)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        DetachedContext.__init__(self, msgspec.json.decode(state["job"], type=Job),
                                 Path(state["data_dir"]), Path(state["input_path"]),
                                 Path(state["progress_file"]))
        self._outputs = list(state["outputs"])


def read_progress(progress_file: Path) -> tuple[float, str] | None:
    """The latest progress a worker process wrote, if any."""
    try:
        data = progress_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        progress = msgspec.json.decode(data, type=_Progress)
    except msgspec.DecodeError:
        return None
    return progress.fraction, progress.message
