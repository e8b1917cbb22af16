"""What a csv_summary job does: stream the CSV in chunks, write a JSON profile."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
from collections.abc import Callable, Iterator
from typing import IO, Any

import msgspec

from kernel.task import BaseProcessor, JobContext
from workflows.common import output_name, submitted_name, write_unless_cancelled

from . import models
from .config import CHUNK_BYTES, CHUNK_CELLS, FIRST_CHUNK_ROWS
from .models import Summary
from .services.table import TableProfile, bad_csv

# A field may be as long as this (Python's default, 128 KiB, refused a cell holding an HTML
# body or a base64 image); memory stays bounded by one row. The limit is the process's.
FIELD_BYTES_MAX = 64 * 1024 * 1024
csv.field_size_limit(max(csv.field_size_limit(), FIELD_BYTES_MAX))


class CsvSummaryProcessor(BaseProcessor):
    """Profiles every column of a CSV in one pass; memory does not grow with the file."""

    Task = models.Task

    def process(self, ctx: JobContext, task: models.Task) -> dict[str, Any]:
        """Read the CSV chunk by chunk; the one output is written last, atomically."""
        size_bytes = ctx.input_path.stat().st_size
        decoder = _decoder_name(task.encoding)
        with ctx.input_path.open("rb") as raw, io.TextIOWrapper(raw, decoder, newline="") as text:
            table = self._profile(ctx, task, text, raw.tell, size_bytes)
        summary = Summary(
            file=str(submitted_name(ctx.job)), size_bytes=size_bytes, rows=table.rows,
            short_rows=table.short_rows, delimiter=task.delimiter, encoding=task.encoding,
            has_header=task.has_header, columns=[c.profile() for c in table.columns])
        write_unless_cancelled(ctx, output_name(ctx.job, ".summary.json"),
                               msgspec.json.format(msgspec.json.encode(summary)) + b"\n")
        ctx.progress(1.0, f"{table.rows} rows profiled")
        return {"rows": table.rows, "columns": len(table.columns), "size_bytes": size_bytes}

    def _profile(self, ctx: JobContext, task: models.Task, text: IO[str],
                 bytes_read: Callable[[], int], size_bytes: int) -> TableProfile:
        reader = csv.reader(text, delimiter=task.delimiter, strict=True)
        table = TableProfile(task.top_k)
        try:
            rows_max = _start(reader, table, task.has_header)
            if rows_max == 0:
                return table  # an empty file (or blank lines only): no columns, no rows
            chunk_rows, before = min(rows_max, FIRST_CHUNK_ROWS), bytes_read()
            while taken := table.add_rows(itertools.islice(reader, chunk_rows)):
                ctx.check_cancelled()
                after = bytes_read()
                ctx.progress(after / max(1, size_bytes), f"{table.rows} rows")
                chunk_rows = _next_chunk_rows(rows_max, taken, after - before)
                before = after
        except csv.Error as exc:
            raise bad_csv(f"line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise bad_csv(f"not {task.encoding} near line {reader.line_num + 1}: "
                          f"{exc.reason}") from None
        return table


def _start(reader: Iterator[list[str]], table: TableProfile, has_header: bool) -> int:
    """Name the columns from the first non-blank row; the rows per chunk (0: empty file)."""
    first = next((row for row in reader if row), None)
    if first is None:
        return 0
    table.set_columns(first if has_header else [""] * len(first))
    if not has_header:
        table.add_rows([first])
    return max(1, CHUNK_CELLS // len(table.columns))


def _next_chunk_rows(rows_max: int, rows: int, bytes_read: int) -> int:
    """Rows for the next chunk: CHUNK_BYTES of text at the last chunk's row size.

    Rows of long text fields would otherwise make a chunk of CHUNK_CELLS cells huge.
    """
    row_bytes = max(1.0, bytes_read / rows)
    return max(1, min(rows_max, int(CHUNK_BYTES / row_bytes)))


def _decoder_name(encoding: str) -> str:
    """UTF-8 files may start with a byte-order mark; read it as one, never as a name."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
