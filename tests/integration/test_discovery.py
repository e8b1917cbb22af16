"""Workflow discovery: the bundled ones, a workflows_dir found by path, module:attr entries;
a broken workflow is reported by name and the others run."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters import Kernel
from adapters.config import load_settings
from adapters.discovery import register_all
from kernel.state import Status

GOOD = '''
from kernel.config import WorkflowConfig
from kernel.task import BaseProcessor

class Echo(BaseProcessor):
    async def process(self, ctx, task):
        return {"ok": True}

processor = Echo()
config = WorkflowConfig(settle_ms=0)
'''


def package(root: Path, name: str, source: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(source)


@pytest.mark.anyio
async def test_broken_workflows_are_reported_and_the_others_run(tmp_path: Path) -> None:
    """An import error, a `sys.exit` at import (a "required setting missing" guard), a bad
    config section, a reserved name and a missing processor are each reported by name;
    the good workflow and the bundled ones register and run."""
    folder = tmp_path / "workflows"
    package(folder, "good", GOOD)
    package(folder, "broken", "import not_a_module_anywhere\n")
    package(folder, "exits", 'import sys\nsys.exit("OCR_API_KEY is not set")\n')
    package(folder, "jobs", GOOD)  # a word the API uses itself
    package(folder, "empty", "x = 1\n")
    package(folder, "misconfigured", GOOD)
    settings = load_settings(None, env={"MULTIFLOW_WORKFLOWS_DIR": str(folder)}, env_file=None,
                             overrides={"workflows": {"misconfigured": {"max_attempts": "x"}}})
    async with Kernel.open(data_dir=tmp_path / "data") as kernel:
        problems = register_all(kernel, settings)
        registered = set(kernel.manager.workflows)
        (tmp_path / "data/good/input/a.txt").write_text("hi")
        job = await kernel.wait((await kernel.submit("good", "a.txt")).id, timeout_s=10)
    assert {"good", "csv_summary", "compress", "thumbnail"} <= registered
    assert not registered & {"broken", "exits", "jobs", "empty", "misconfigured"}
    assert "ModuleNotFoundError" in problems["broken"]
    assert "OCR_API_KEY is not set" in problems["exits"]
    assert "reserved" in problems["jobs"]
    assert "processor" in problems["empty"]
    assert "workflows.misconfigured" in problems["misconfigured"]
    assert job.status is Status.COMPLETED


@pytest.mark.anyio
async def test_module_attr_entries_are_registered(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A `module:` entry in the settings names an importable module that is a workflow."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "entry_flow.py").write_text(GOOD)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    settings = load_settings(None, env={
        "MULTIFLOW_WORKFLOWS_DIR": str(tmp_path / "none"),
        "MULTIFLOW_WORKFLOW_ENTRIES": "entry_flow:"}, env_file=None)
    async with Kernel.open(data_dir=tmp_path / "data") as kernel:
        problems = register_all(kernel, settings)
        registered = set(kernel.manager.workflows)
    assert problems == {} and "entry_flow" in registered
