"""The kernel stays pure: no module under kernel/ imports the outside world."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[2] / "kernel"

FORBIDDEN = frozenset(
    {
        "aiosqlite",
        "starlette",
        "uvicorn",
        "watchfiles",
        "structlog",
        "os",
        "shutil",
        "time",
        "random",
        "uuid",
        "sqlite3",
        "psycopg",
        "httpx",
        "httpx2",
        "subprocess",
        "socket",
    }
)
# Only the JobManager's async loop may use anyio; the decider and projections may not.
# The manager (with its duties: intake.py, nodes.py, host.py) and the attempt it runs form
# the async loop; the decider and the rest stay pure.
ANYIO_ALLOWED_IN = frozenset({"manager.py", "intake.py", "nodes.py", "host.py", "attempt.py"})


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, top-level module) for every absolute import in the source, nested ones too."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(source: str, file_name: str) -> list[str]:
    """Why `source` (a kernel module named `file_name`) breaks the purity rule, if it does."""
    banned = FORBIDDEN if file_name in ANYIO_ALLOWED_IN else FORBIDDEN | {"anyio"}
    return [
        f"{file_name}:{line} imports {module}"
        for line, module in imported_modules(source)
        if module in banned
    ]


def kernel_modules() -> list[Path]:
    return sorted(KERNEL.rglob("*.py"))


def test_the_walk_sees_the_kernel_modules() -> None:
    """The checker looks at the real kernel files, so an empty walk cannot pass vacuously."""
    names = {path.name for path in kernel_modules()}
    assert {
        "events.py",
        "state.py",
        "decide.py",
        "queue.py",
        "config.py",
        "chain.py",
        "layout.py",
    } <= names


def test_kernel_imports_nothing_forbidden() -> None:
    """No kernel module imports I/O, clock, randomness or framework libraries."""
    found = [
        problem
        for path in kernel_modules()
        for problem in violations(path.read_text(encoding="utf-8"), path.name)
    ]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import os.path",
        "from os import path",
        "from os.path import join",
        "import time as clock",
        "from random import random",
        "import uuid, msgspec",
        "def f():\n    import shutil\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sqlite3\n",
        "try:\n    import httpx2\nexcept ImportError:\n    pass\n",
        "import anyio",
        "from anyio import create_task_group",
    ],
)
def test_the_checker_catches_a_forbidden_import(source: str) -> None:
    """A synthetic kernel module with a forbidden import, in any form, is reported."""
    assert violations(source, "decide.py") != []


@pytest.mark.parametrize(
    "source",
    [
        "import msgspec",
        "from datetime import UTC, datetime, time",
        "from kernel import layout",
        "from . import layout",
        "import hashlib, heapq, itertools",
        "from posixpath import basename",
        "import timeit_not_time_but_similar",
    ],
)
def test_the_checker_allows_pure_imports(source: str) -> None:
    """Standard pure modules and look-alike names are not flagged."""
    assert violations(source, "decide.py") == []


def test_only_the_manager_may_import_anyio() -> None:
    """anyio is allowed in kernel/manager.py alone; other forbidden imports stay banned there."""
    assert violations("import anyio\nfrom anyio import abc", "manager.py") == []
    assert violations("import anyio", "queue.py") == ["queue.py:1 imports anyio"]
    assert violations("import anyio\nimport os", "manager.py") == ["manager.py:2 imports os"]
