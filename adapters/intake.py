"""Intake checks: every file passes them before its job may start.

In order, cheapest and safest first: the size limit, the allowed types (magic bytes
and extension), structural completeness, the virus scan, and last the workflow's
own `validate_file`, so that a workflow's parser never sees an unscanned file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import anyio.from_thread

from adapters.filetypes import end_checked, read_sample, sniff, truncation, type_refusal
from kernel.config import WorkflowConfig
from kernel.ports import Refusal, ScannerUnavailable
from kernel.task import BaseProcessor


class Scanner(Protocol):
    """A virus scanner: a Refusal (Infected, TooLarge) or None when clean.

    It raises ScannerUnavailable whenever it cannot tell; that never means clean.
    """

    async def scan_file(self, path: Path) -> Refusal | None:
        """Scan one file."""
        ...


class IntakeChecker:
    """Size limit, allowed types, completeness, virus scan and the workflow's `validate_file`."""

    def __init__(self, scanner: Scanner | None = None) -> None:
        self.scanner = scanner

    def check(self, path: Path, config: WorkflowConfig,
              processor: BaseProcessor) -> Refusal | None:
        """A refusal (final) or None; raises ScannerUnavailable to make the job wait.

        Runs in an anyio worker thread: it reads the file, and reaches the async
        scanner through `anyio.from_thread.run`.
        """
        try:
            return self._check(path, config, processor)
        except FileNotFoundError:
            return Refusal("FileMissing", f"{path.name} is not there any more")
        except (IsADirectoryError, PermissionError) as error:
            return Refusal("Unreadable", f"{path.name} cannot be read: {error.strerror}")

    def _check(self, path: Path, config: WorkflowConfig,
               processor: BaseProcessor) -> Refusal | None:
        size = path.stat().st_size
        if config.max_size_bytes is not None and size > config.max_size_bytes:
            return Refusal("TooLarge", f"{size} bytes is over the limit of {config.max_size_bytes}")
        refusal = self._content_refusal(path, config)
        if refusal is None and config.scan:
            refusal = self._scan(path)
        if refusal is None:
            refusal = _validate(processor, path)
        return refusal

    def _content_refusal(self, path: Path, config: WorkflowConfig) -> Refusal | None:
        """TypeNotAllowed or Truncated, judged from the file's head and tail."""
        if not config.allowed_types and not config.check_complete:
            return None
        sample = read_sample(path)
        if not config.allowed_types and not end_checked(sample.head):
            return None  # every type is allowed, and this one has no end to check
        sniffed = sniff(sample, path.name)
        if reason := type_refusal(sniffed, path.name, config.allowed_types):
            return Refusal("TypeNotAllowed", reason)
        if config.check_complete and (reason := truncation(sniffed, sample)):
            return Refusal("Truncated", f"{path.name} ({sniffed.description}) is cut short: "
                                        f"{reason}")
        return None

    def _scan(self, path: Path) -> Refusal | None:
        if self.scanner is None:
            raise ScannerUnavailable("scan is on for this workflow but no scanner is configured")
        return anyio.from_thread.run(self.scanner.scan_file, path)


def _validate(processor: BaseProcessor, path: Path) -> Refusal | None:
    """The workflow's own check; one that raises refuses the file rather than the kernel."""
    try:
        reason = processor.validate_file(path)
    except Exception as exc:  # a workflow's check is its code, not ours: refuse, say why
        return Refusal("ValidationError", f"validate_file raised {type(exc).__name__}: {exc}")
    return Refusal("ValidationError", reason) if reason else None
