"""A whole table's profile: the header, ragged rows, and one ColumnStats per column."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kernel.task import JobError

from ..config import COLUMNS_MAX, top_counters
from .profile import ColumnStats


def bad_csv(message: str) -> JobError:
    """The final failure of a file that is not the CSV it claims to be."""
    return JobError("BadCsv", message, retryable=False)


def column_names(header: Sequence[str]) -> list[str]:
    """Header cells as unique names: blanks become `column_{n}`, repeats get `_2`, `_3`."""
    names: list[str] = []
    seen: set[str] = set()
    for number, cell in enumerate(header, start=1):
        base = cell.strip() or f"column_{number}"
        name, repeat = base, 1
        while name in seen:
            repeat += 1
            name = f"{base}_{repeat}"
        seen.add(name)
        names.append(name)
    return names


class TableProfile:
    """Rows in, per-column statistics out; the column count is fixed by the first row."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.columns: list[ColumnStats] = []
        self.rows = 0
        self.short_rows = 0
        self._blank_lines = 0  # in the chunk being read

    def set_columns(self, names: Sequence[str]) -> None:
        """Name the columns (from the header, or `column_{n}` from the first row's width)."""
        if len(names) > COLUMNS_MAX:
            raise bad_csv(f"{len(names)} columns is over the limit of {COLUMNS_MAX}")
        counters = top_counters(len(names), self.top_k)
        self.columns = [ColumnStats(name, self.top_k, counters) for name in column_names(names)]

    def add_rows(self, rows: Iterable[list[str]]) -> int:
        """Take one chunk of parsed rows; how many were read, blank lines included (0: end).

        Rows are flattened as they come, so no row list outlives its loop turn: the
        garbage collector then has next to nothing to walk.
        """
        width = len(self.columns)
        cells: list[str] = []
        extend = cells.extend
        self._blank_lines = 0
        for row in rows:
            extend(row if len(row) == width else self._even(row, width, len(cells)))
        if cells:
            for number, stats in enumerate(self.columns):
                stats.add(cells[number::width])  # slicing transposes faster than zip(*rows)
            self.rows += len(cells) // width
        return len(cells) // width + self._blank_lines

    def _even(self, row: list[str], width: int, cells_before: int) -> list[str]:
        """A blank line is skipped, a short row padded with nulls, a long one refused."""
        if not row:
            self._blank_lines += 1
            return row
        if len(row) > width:
            record = self.rows + cells_before // width + 1
            raise bad_csv(f"data row {record} has {len(row)} fields, not {width}")
        self.short_rows += 1
        return row + [""] * (width - len(row))
