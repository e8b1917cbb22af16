"""Log lines: one JSON encoding per line, per-workflow files rotated by size."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

import adapters.logs
from adapters.logs import RotatingFile, WorkflowFiles, json_line


def test_a_line_is_json_and_what_json_lacks_is_text(tmp_path: Path) -> None:
    """Values JSON has no type for (a path, an exception) are written as their str."""
    line = json_line({"event": "x", "path": tmp_path, "error": ValueError("bad"), "n": 1.5,
                      "name": "café"})
    assert json.loads(line) == {"event": "x", "path": str(tmp_path), "error": "bad",
                                "n": 1.5, "name": "café"}


def test_rotation_keeps_the_newest_lines_first_in_dot_one(tmp_path: Path) -> None:
    """A file that would pass its size moves to .1, .1 to .2; older ones beyond are dropped."""
    file = RotatingFile(tmp_path / "w.log", max_bytes=20, backups=2)
    for number in range(5):
        file.write(b"line %d 0123456789" % number)  # 18 bytes and a newline: one per file
    file.close()
    assert (tmp_path / "w.log").read_bytes() == b"line 4 0123456789\n"
    assert (tmp_path / "w.log.1").read_bytes() == b"line 3 0123456789\n"
    assert (tmp_path / "w.log.2").read_bytes() == b"line 2 0123456789\n"
    assert not (tmp_path / "w.log.3").exists()


def test_lines_from_many_threads_stay_whole(tmp_path: Path) -> None:
    """Threads log too: every line is written whole, none interleaved or lost."""
    files = WorkflowFiles(tmp_path, max_bytes=10**9, backups=1)

    def log(thread: int) -> None:
        for number in range(500):
            files.copy({"workflow_name": "w", "thread": thread, "n": number}, None)

    threads = [threading.Thread(target=log, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files.close()
    lines = [json.loads(line) for line in (tmp_path / "w.log").read_text().splitlines()]
    assert sorted((line["thread"], line["n"]) for line in lines) == \
        [(t, n) for t in range(8) for n in range(500)]


def test_lines_without_a_valid_workflow_name_get_no_file(tmp_path: Path) -> None:
    """Only a name that is a workflow's gets a file: never a path out of the log folder."""
    files = WorkflowFiles(tmp_path, max_bytes=10**9, backups=1)
    files.copy({"workflow_name": "../escape"}, None)
    files.copy({"event": "no workflow"}, None)
    files.close()
    assert list(tmp_path.iterdir()) == []


def test_text_that_is_not_utf8_is_written_escaped() -> None:
    """A file name read with surrogateescape is logged with backslash escapes (the line
    raised, and the watcher logging why it refused the file died of it)."""
    line = json.loads(json_line({"event": "file_rejected", "name": "caf\udce9.txt",
                                 "more": ["\udcff"]}))
    assert line == {"event": "file_rejected", "name": "caf\\udce9.txt", "more": ["\\udcff"]}


def test_a_file_moved_away_or_removed_is_reopened_at_its_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """logrotate without copytruncate, or an operator's `rm`: the next lines go to a new
    file at the path (the next rotation raised, and took the node's observer with it)."""
    monkeypatch.setattr(adapters.logs, "REOPEN_CHECK_S", 0.0)
    file = RotatingFile(tmp_path / "w.log", max_bytes=60, backups=2)
    file.write(b"first line 0123456789")
    (tmp_path / "w.log").rename(tmp_path / "w.log.old")
    file.write(b"second line 0123456789")
    file.write(b"third line 0123456789")
    (tmp_path / "w.log").unlink()
    file.write(b"fourth line 0123456789")
    file.close()
    assert (tmp_path / "w.log").read_bytes() == b"fourth line 0123456789\n"
    assert b"first line" in (tmp_path / "w.log.old").read_bytes()


def test_a_write_that_fails_never_raises_into_the_caller(tmp_path: Path) -> None:
    """A log line that cannot be written (a full disk) is dropped, not raised; the file
    takes lines again once it can."""

    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise OSError(28, "No space left on device")

    file = RotatingFile(tmp_path / "w.log", max_bytes=1000, backups=1)
    real, file._file = file._file, FullDisk()
    file.write(b"lost line")
    file._file = real
    file.write(b"a line")
    file.close()
    assert (tmp_path / "w.log").read_bytes() == b"a line\n"
