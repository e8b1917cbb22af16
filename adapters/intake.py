"""Intake checks: every file passes them before its job may start."""

from __future__ import annotations

from pathlib import Path

from kernel.config import WorkflowConfig
from kernel.ports import Refusal
from kernel.task import BaseProcessor


class IntakeChecker:
    """Size limit, allowed types and the workflow's own `validate_file`."""

    def check(self, path: Path, config: WorkflowConfig,
              processor: BaseProcessor) -> Refusal | None:
        """A refusal (final) or None; runs in a worker thread (it reads the file)."""
        size = path.stat().st_size
        if config.max_size_bytes is not None and size > config.max_size_bytes:
            return Refusal("TooLarge", f"{size} bytes is over the limit of {config.max_size_bytes}")
        extensions = [t.lower() for t in config.allowed_types if t.startswith(".")]
        if extensions and path.suffix.lower() not in extensions:
            return Refusal("TypeNotAllowed", f"{path.suffix or 'no extension'} is not allowed")
        reason = processor.validate_file(path)
        if reason:
            return Refusal("ValidationError", reason)
        return None
