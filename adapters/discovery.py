"""Finding workflows: the bundled ones, those in `workflows_dir`, and `module:attr` entries.

A workflow is a package (`workflows/{name}/__init__.py`) exposing `processor` (a
BaseProcessor instance), and optionally `config` (a WorkflowConfig) and `watcher`
(a BaseWatcher subclass). A broken one is reported by name and skipped; the
others still run.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

from adapters.bootstrap import Kernel
from adapters.config import Settings, SettingsError, workflow_config
from kernel.config import WorkflowConfig
from kernel.task import BaseProcessor

log = structlog.get_logger("multiflow.discovery")
USER_PACKAGE = "multiflow_user_workflows"


def register_all(kernel: Kernel, settings: Settings) -> dict[str, str]:
    """Register every workflow found; returns {name: problem} for those that could not be."""
    problems: dict[str, str] = {}
    for name, load in _candidates(settings):
        if name in kernel.manager.workflows:
            continue
        try:
            module = load()
            _register(kernel, settings, name, module)
        except (Exception, SystemExit) as exc:  # a broken workflow must not take the others
            # down: `sys.exit("OCR_API_KEY is not set")` at import is a problem of its own
            problems[name] = f"{type(exc).__name__}: {exc}"
            log.error("workflow_not_registered", workflow_name=name, problem=problems[name])
    return problems


def _candidates(settings: Settings) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    import workflows as bundled

    for info in pkgutil.iter_modules(bundled.__path__):
        if info.ispkg and not info.name.startswith("_"):
            found.append((info.name, lambda n=info.name: importlib.import_module(f"workflows.{n}")))
    folder = Path(settings.workflows_dir)
    bundled_dir = Path(bundled.__path__[0]).resolve()
    if folder.is_dir() and folder.resolve() != bundled_dir:
        for path in sorted(folder.iterdir()):
            if (path / "__init__.py").is_file() and not path.name.startswith(("_", ".")):
                found.append((path.name, lambda p=path: load_package(p)))
    for entry in settings.workflow_entries:
        module_name, _, attr = entry.partition(":")
        name = attr or module_name.rsplit(".", 1)[-1]
        found.append((name, lambda m=module_name, a=attr: _entry(m, a)))
    return found


def load_package(path: Path) -> ModuleType:
    """Import a workflow package from a folder (so a pip-installed multiflow finds it)."""
    if USER_PACKAGE not in sys.modules:
        parent = ModuleType(USER_PACKAGE)
        parent.__path__ = []
        sys.modules[USER_PACKAGE] = parent
    qualified = f"{USER_PACKAGE}.{path.name}"
    spec = importlib.util.spec_from_file_location(
        qualified, path / "__init__.py", submodule_search_locations=[str(path)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[qualified]
        raise
    return module


def _entry(module_name: str, attr: str) -> Any:
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _register(kernel: Kernel, settings: Settings, name: str, module: Any) -> None:
    processor = getattr(module, "processor", None)
    if isinstance(processor, type) and issubclass(processor, BaseProcessor):
        processor = processor()
    if not isinstance(processor, BaseProcessor):
        raise TypeError("the package must expose `processor`, a BaseProcessor instance")
    base = getattr(module, "config", None) or WorkflowConfig()
    if not isinstance(base, WorkflowConfig):
        raise TypeError("`config` must be a WorkflowConfig")
    try:
        config = workflow_config(settings, name, base)
    except SettingsError:
        raise
    kernel.register_workflow(name, processor, config=config,
                             watcher=getattr(module, "watcher", None))
