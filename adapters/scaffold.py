"""`multiflow new-workflow NAME`: a working workflow package in the seed's shape, with a test."""

from __future__ import annotations

import sys
from pathlib import Path

from kernel.layout import check_workflow_name

FILES: dict[str, str] = {
    "__init__.py": '''"""The {name} workflow: what `register_workflow` needs."""

from .config import config
from .models import Task
from .processor import Processor

processor = Processor()

__all__ = ["Task", "config", "processor"]
''',
    "config.py": '''"""Settings of {name}; [workflows.{name}] in multiflow.toml overrides them."""

from kernel.config import WorkflowConfig

config = WorkflowConfig(
    concurrency=1,  # jobs of this workflow at once
    timeout_s=600,  # a job running longer is stopped and retried
    max_attempts=3,
    settle_ms=500,  # a dropped file must be unchanged this long before it becomes a job
    max_size_bytes=100 * 1024 * 1024,
    allowed_types=(".txt", ".csv", "text/plain"),
    runner="thread",  # a plain `def process` runs in a worker thread ("process": a process)
)
''',
    "models.py": '''"""The parameters a {name} job takes (validated when the job is created)."""

from typing import Annotated

import msgspec

from kernel.task import BaseTask


class Task(BaseTask):
    """Parameters of one {name} job; every field needs a default."""

    uppercase: bool = False
    max_lines: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 1_000_000
''',
    "processor.py": '''"""What a {name} job does with its file."""

from __future__ import annotations

import json
from typing import Any

from kernel.task import BaseProcessor, JobContext, JobError

from .models import Task


class Processor(BaseProcessor):
    """Counts the lines and words of a text file and writes a copy and a summary."""

    Task = Task

    def process(self, ctx: JobContext, task: Task) -> dict[str, Any]:
        """Read the input line by line (bounded memory), write the outputs atomically."""
        size = ctx.input_path.stat().st_size or 1
        lines = words = 0
        name = ctx.input_path.name.split("--", 1)[-1]
        with ctx.input_path.open(encoding="utf-8", errors="replace") as source, \\
                ctx.open_output(name, "w") as copy:
            for line in source:
                lines += 1
                if lines > task.max_lines:
                    raise JobError("TooManyLines", f"more than {{task.max_lines}} lines",
                                   retryable=False)
                words += len(line.split())
                copy.write(line.upper() if task.uppercase else line)
                if lines % 10_000 == 0:
                    ctx.check_cancelled()
                    ctx.progress(source.tell() / size, f"{{lines}} lines")
        summary = {{"lines": lines, "words": words}}
        with ctx.open_output(name + ".summary.json", "w") as out:
            json.dump(summary, out)
        return summary
''',
    "services/__init__.py": '''"""The {name} workflow's larger pieces of logic."""
''',
    "utils/__init__.py": '''"""Small helpers of the {name} workflow."""
''',
    "tests/__init__.py": "",
    "tests/test_{name}.py": '''"""The {name} workflow end to end: drop a file, see it complete."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from adapters import Kernel
from adapters.discovery import load_package

HERE = Path(__file__).resolve().parents[1]


def test_a_dropped_file_is_processed(tmp_path: Path) -> None:
    """A file in input/ becomes a completed job with its outputs in output/."""
    workflow = load_package(HERE)

    async def scenario() -> None:
        async with Kernel.open(data_dir=tmp_path) as kernel:
            kernel.register_workflow("{name}", workflow.processor, config=workflow.config)
            (tmp_path / "{name}/input/hello.txt").write_text("hello world\\nbye\\n")
            job = await kernel.submit("{name}", "hello.txt", params={{"uppercase": True}})
            done = await kernel.wait(job.id, timeout_s=30)
            assert str(done.status) == "completed", done.error
            assert done.result == {{"lines": 2, "words": 3}}

    anyio.run(scenario)
    assert (tmp_path / "{name}/output/hello.txt").read_text() == "HELLO WORLD\\nBYE\\n"
    summary = json.loads((tmp_path / "{name}/output/hello.txt.summary.json").read_text())
    assert summary == {{"lines": 2, "words": 3}}
''',
}


TAKEN_NAMES = frozenset({"kernel", "adapters", "workflows", "tests", "multiflow"})


class ScaffoldError(ValueError):
    """The workflow cannot be created (bad name, folder exists)."""


def new_workflow(name: str, workflows_dir: Path) -> list[Path]:
    """Write the package `workflows_dir/name/`; returns the files written."""
    problem = check_workflow_name(name)
    if problem:
        raise ScaffoldError(f"invalid workflow name {name!r}: {problem}")
    if name in sys.stdlib_module_names or name in TAKEN_NAMES:
        # Its own test imports the package by its name: it would find the other module.
        raise ScaffoldError(f"invalid workflow name {name!r}: a Python module of that name "
                            "exists (the standard library's, or multiflow's own); choose "
                            f"another, such as {name}_files")
    root = workflows_dir / name
    if root.exists():
        raise ScaffoldError(f"{root} already exists")
    written = []
    for relative, template in FILES.items():
        path = root / relative.format(name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name))
        written.append(path)
    return written
