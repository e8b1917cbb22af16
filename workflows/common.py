"""Helpers every bundled workflow uses: output names from the submitted name, careful writes."""

from __future__ import annotations

from pathlib import PurePosixPath

from kernel.state import Job
from kernel.task import JobContext


def submitted_name(job: Job) -> PurePosixPath:
    """The input's path inside the hot folder as submitted (`sub/a.csv`), without the job id."""
    return PurePosixPath(job.file_path.removeprefix(f"{job.workflow_name}/input/"))


def output_name(job: Job, suffix: str) -> str:
    """`sub/a.csv` with `suffix` after its whole name: `sub/a.csv.summary.json`. The whole
    name, so that `a.csv` and `a.tsv` (or `a.jpg` and `a.jpeg`) never share an output."""
    return f"{submitted_name(job)}{suffix}"


def write_unless_cancelled(ctx: JobContext, name: str, data: bytes) -> None:
    """Write output/{name} atomically; remove it again if a cancel arrived meanwhile.

    A cancelled worker thread is abandoned, not stopped: a cancel that lands while
    the output is written must not leave the output of a cancelled job behind.
    """
    with ctx.open_output(name) as out:
        out.write(data)
    if ctx.cancelled:
        (ctx.output_dir / name).unlink(missing_ok=True)
        ctx.check_cancelled()
