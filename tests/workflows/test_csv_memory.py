"""csv_summary's memory does not grow with the file: a 200 MB CSV in a child process."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.anyio

CSV_BYTES = 200 * 1024 * 1024
DISK_NEEDED_BYTES = 3 * CSV_BYTES  # the file, its archived copy is a rename; headroom
RSS_LIMIT_KB = 150 * 1024
ROOT = Path(__file__).resolve().parents[2]


def write_csv(path: Path, size_bytes: int) -> int:
    """Rows with a unique id, a unique hex key, an amount, a category and a comment; rows."""
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("id,key,amount,category,comment\n")
        while out.tell() < size_bytes:
            block = range(rows, rows + 50_000)
            out.write("".join(
                f"{i},{i * 2654435761 % 2**64:016x},{i % 100_003 / 100:.2f},cat{i % 37},"
                f"comment number {i % 5_000} about nothing in particular\n" for i in block))
            rows += len(block)
    return rows


def write_long_fields(path: Path, size_bytes: int) -> int:
    """Rows of two 20 KB text fields: chunks sized by cells alone would hold the whole file."""
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("id,body,notes\n")
        while out.tell() < size_bytes:
            out.write("".join(f"{i},{'lorem ipsum ' * 1700}{i},{'x' * 20_000}\n"
                              for i in range(rows, rows + 500)))
            rows += 500
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("write", [write_csv, write_long_fields],
                         ids=["narrow-rows", "long-fields"])
async def test_a_200_mb_csv_is_profiled_in_bounded_memory(
        tmp_path: Path, write: Callable[[Path, int], int]) -> None:
    """The child's peak RSS stays under 150 MB while it profiles 200 MB of CSV."""
    if shutil.disk_usage(tmp_path).free < DISK_NEEDED_BYTES:
        pytest.skip(f"needs {DISK_NEEDED_BYTES // 2**20} MiB free in {tmp_path}")
    inbox = tmp_path / "csv_summary" / "input"
    inbox.mkdir(parents=True)
    try:
        rows = await anyio.to_thread.run_sync(write, inbox / "big.csv", CSV_BYTES)
        child = await anyio.run_process(
            [sys.executable, "-m", "tests.workflows.csv_memory_child", str(tmp_path), "big.csv"],
            cwd=ROOT, check=True)
    finally:  # pytest keeps the last runs' temp folders: do not leave 200 MB behind
        for big in tmp_path.rglob("*big.csv"):
            big.unlink()
    report = json.loads(child.stdout.decode().strip().splitlines()[-1])
    assert report["status"] == "completed", report
    assert report["result"]["rows"] == rows
    assert report["peak_rss_kb"] < RSS_LIMIT_KB, report
    summary = json.loads((tmp_path / "csv_summary/output/big.csv.summary.json").read_text())
    assert summary["columns"][0]["max"] == rows - 1
