"""structlog, configured once at start: JSON lines on stdout, and one file per workflow.

Every line that carries a `workflow_name` is also written to
`data/logs/{workflow}.log`, rotated by size with a kept count.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

import structlog

from kernel.layout import WORKFLOW_NAME


class WorkflowFiles:
    """A structlog processor that copies each workflow's lines into its own rotated file."""

    def __init__(self, log_dir: Path, max_bytes: int, backups: int) -> None:
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.backups = backups
        self._loggers: dict[str, logging.Logger] = {}

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        workflow = event_dict.get("workflow_name")
        if isinstance(workflow, str) and WORKFLOW_NAME.match(workflow):
            line = json.dumps(event_dict, default=str, ensure_ascii=False)
            self._logger(workflow).info(line)
        return event_dict

    def _logger(self, workflow: str) -> logging.Logger:
        found = self._loggers.get(workflow)
        if found is not None:
            return found
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            self.log_dir / f"{workflow}.log", maxBytes=self.max_bytes,
            backupCount=self.backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger(f"multiflow.workflow_file.{workflow}")
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        self._loggers[workflow] = logger
        return logger

    def close(self) -> None:
        """Close every file."""
        for logger in self._loggers.values():
            for handler in logger.handlers:
                handler.close()
        self._loggers.clear()


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    log_dir: Path | None = None,
    file_max_bytes: int = 10 * 1024 * 1024,
    file_backups: int = 5,
) -> WorkflowFiles | None:
    """JSON lines on stdout (or console rendering on a terminal); per-workflow files."""
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else \
        structlog.processors.JSONRenderer()
    files = WorkflowFiles(log_dir, file_max_bytes, file_backups) if log_dir else None
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if files is not None:
        processors.append(files)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    return files
