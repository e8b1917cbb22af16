"""structlog, configured once at start: JSON lines on stdout, and one file per workflow.

Every line that carries a `workflow_name` is also written to
`data/logs/{workflow}.log`, rotated by size with a kept count (`.1` the newest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import structlog

from kernel.layout import WORKFLOW_NAME

_encode = msgspec.json.Encoder(enc_hook=str).encode  # what JSON does not know, as text
REOPEN_CHECK_S = 1.0  # how often a log file checks that its path is still the file it writes


def json_line(event_dict: dict[str, Any]) -> bytes:
    """One log line's JSON (UTF-8, no newline). Text that is not UTF-8 (a file name read
    with surrogateescape) is written with backslash escapes instead of refused."""
    try:
        return _encode(event_dict)
    except UnicodeEncodeError:
        return _encode(_printable(event_dict))


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


class RotatingFile:
    """Appends lines to a file, rotated once it would pass `max_bytes` (`path.1` the newest
    of `backups` kept). Thread-safe: threads log too.

    A line never raises into its caller: a file moved or removed under it (logrotate, an
    operator's `rm`) is reopened at its path, and a write that fails (a full disk) is
    reported once on stderr and dropped."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = max(1, backups)
        self._lock = threading.Lock()
        self._file: BinaryIO = path.open("ab")
        self._size = self._file.tell()
        self._checked_s = time.monotonic()
        self._failing = False

    def write(self, line: bytes) -> None:
        """Append one line (its newline is added here)."""
        with self._lock:
            try:
                self._write(line)
            except OSError as exc:
                if not self._failing:
                    self._failing = True
                    print(f"multiflow: cannot write {self.path}: {exc}; its lines are dropped "
                          "until it can", file=sys.stderr, flush=True)
                return
            self._failing = False

    def _write(self, line: bytes) -> None:
        now_s = time.monotonic()
        if now_s - self._checked_s >= REOPEN_CHECK_S or self._file.closed:
            self._checked_s = now_s
            self._reopen_if_moved()
        if self._size > 0 and self._size + len(line) + 1 > self.max_bytes:
            self._rotate()
        self._file.write(line + b"\n")
        self._file.flush()
        self._size += len(line) + 1

    def _reopen_if_moved(self) -> None:
        try:
            same = not self._file.closed and \
                os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self._open()

    def _open(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def _rotate(self) -> None:
        self._file.close()
        for number in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            with contextlib.suppress(FileNotFoundError):
                older.replace(self.path.with_name(f"{self.path.name}.{number + 1}"))
        with contextlib.suppress(FileNotFoundError):  # moved away meanwhile: start anew
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()


class WorkflowFiles:
    """Copies each workflow's lines into its own rotated file, `{log_dir}/{workflow}.log`."""

    def __init__(self, log_dir: Path, max_bytes: int, backups: int) -> None:
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.backups = backups
        self._files: dict[str, RotatingFile] = {}
        self._lock = threading.Lock()

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor: the copy, for a console-rendered stdout."""
        self.copy(event_dict, None)
        return event_dict

    def copy(self, event_dict: dict[str, Any], line: bytes | None) -> None:
        """Write the line (encoded here when not given) to its workflow's file, if any."""
        workflow = event_dict.get("workflow_name")
        if isinstance(workflow, str) and WORKFLOW_NAME.match(workflow):
            self._file(workflow).write(line if line is not None else json_line(event_dict))

    def _file(self, workflow: str) -> RotatingFile:
        found = self._files.get(workflow)
        if found is not None:
            return found
        with self._lock:
            if workflow not in self._files:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self._files[workflow] = RotatingFile(self.log_dir / f"{workflow}.log",
                                                     self.max_bytes, self.backups)
            return self._files[workflow]

    def close(self) -> None:
        """Close every file."""
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files.clear()


class JsonLines:
    """The renderer for JSON output: each line encoded once, for stdout and for its
    workflow's file (two `json.dumps` and a stdlib LogRecord per line cost ~90 µs)."""

    def __init__(self, files: WorkflowFiles | None) -> None:
        self.files = files

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        line = json_line(event_dict)
        if self.files is not None:
            self.files.copy(event_dict, line)
        return line.decode()


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
    files = WorkflowFiles(log_dir, file_max_bytes, file_backups) if log_dir else None
    renderer: Any = structlog.dev.ConsoleRenderer() if console else JsonLines(files)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if files is not None and console:
        processors.append(files)  # JsonLines copies the lines it renders itself
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    return files
