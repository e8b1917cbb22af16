"""Output names derived from the name a file was submitted under."""

from __future__ import annotations

from pathlib import PurePosixPath

from kernel.state import Job


def submitted_name(job: Job) -> PurePosixPath:
    """The input's path inside the hot folder as submitted (`sub/a.csv`), without the job id."""
    return PurePosixPath(job.file_path.removeprefix(f"{job.workflow_name}/input/"))


def output_name(job: Job, suffix: str) -> str:
    """`sub/a.csv` with its last extension replaced: `output_name(job, ".summary.json")`."""
    name = submitted_name(job)
    return str(name.with_name(name.stem + suffix))
