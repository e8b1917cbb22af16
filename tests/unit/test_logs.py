"""Log lines: one JSON encoding per line, per-workflow files rotated by size."""

from __future__ import annotations

import json
import threading
from pathlib import Path

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
