"""Column profiles built chunk by chunk, in memory that does not grow with the file."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from operator import mul

from ..config import DISTINCT_SKETCH_K, TOP_VALUE_CHARS_MAX
from ..models import ColumnProfile, Kind, TopValue
from ..utils.sketches import DistinctSketch, TopValues

Number = int | float


class NumericStats:
    """Min, max and an exact-as-possible sum of the numbers seen (integers stay integers)."""

    def __init__(self) -> None:
        self.minimum: Number | None = None
        self.maximum: Number | None = None
        self.int_total = 0
        self.float_total = 0.0

    def add(self, values: Collection[str], counts: Collection[int] | None = None) -> bool:
        """Take distinct values with their counts, or plain cells; False if one is no number."""
        numbers: Sequence[Number]
        try:
            numbers = list(map(int, values))  # faster than float, and exact
            self.int_total += sum(numbers if counts is None else map(mul, numbers, counts))
        except ValueError:
            floats = _floats(values)
            if floats is None:
                return False
            chunk_total = _fsum(floats if counts is None else map(mul, floats, counts))
            # nan or inf make the sum nan or inf, so the sum tells when to look closer
            if not math.isfinite(chunk_total) and not all(map(math.isfinite, floats)):
                return False  # nan, inf: words here, not numbers
            numbers = floats
            self._add_float_total(chunk_total)
        low, high = min(numbers), max(numbers)
        self.minimum = low if self.minimum is None else min(self.minimum, low)
        self.maximum = high if self.maximum is None else max(self.maximum, high)
        return True

    def _add_float_total(self, chunk_total: float) -> None:
        self.float_total = _fsum((self.float_total, chunk_total))

    def mean(self, count: int) -> float:
        """The mean of `count` numbers (inf when the sum is beyond the float range)."""
        try:
            return (self.int_total + self.float_total) / count
        except OverflowError:
            return math.inf


def _floats(values: Collection[str]) -> list[float] | None:
    """The values as floats, or None if one does not parse."""
    try:
        return list(map(float, values))
    except ValueError:
        return None


def _fsum(numbers: Iterable[float]) -> float:
    """An exactly rounded sum; inf past the float range, nan for inf - inf."""
    try:
        return math.fsum(numbers)
    except OverflowError:  # finite numbers whose sum leaves the float range
        return math.inf
    except ValueError:  # fsum refuses inf + -inf
        return math.nan


class ColumnStats:
    """Counts, sketches and numeric bounds of one column.

    Each chunk is counted exactly first (a C-speed Counter), so every later step costs
    once per distinct value of the chunk, however often it repeats. A numeric column of
    mostly unique values (ids, prices) skips the Counter: it would buy nothing.
    """

    def __init__(self, name: str, top_k: int, top_counters: int) -> None:
        self.name = name
        self.top_k = top_k
        self.count = 0
        self.nulls = 0
        self.numbers: NumericStats | None = NumericStats()  # None once a value is not a number
        self.sparse = False  # the last counted chunk was mostly unique values
        self.distinct = DistinctSketch(DISTINCT_SKETCH_K)
        self.top = TopValues(top_counters, TOP_VALUE_CHARS_MAX)

    def add(self, cells: list[str]) -> None:
        """Take one chunk of this column's cells."""
        if self.sparse and self._add_sparse(cells):
            return
        counted = Counter(cells)
        nulls = counted.pop("", 0)
        self.nulls += nulls
        seen_before, self.count = self.count, self.count + len(cells) - nulls
        self.sparse = len(counted) * 2 > len(cells)
        if not counted:
            return
        self.distinct.add_all(counted)
        if self.numbers is not None:
            if self.numbers.add(counted, counted.values()):
                return  # numeric columns report no top values, so none are kept
            self.numbers = None
            self.top.missed(seen_before)  # the values counted while the column was numeric
        self.top.add_counts(counted)

    def _add_sparse(self, cells: list[str]) -> bool:
        """Numbers and hashes straight from the cells; False (nothing taken) on a non-number."""
        if self.numbers is None:
            return False
        nulls = cells.count("")
        values = [cell for cell in cells if cell] if nulls else cells
        if not self.numbers.add(values):
            return False  # the counted path takes this chunk and makes the column text
        self.nulls += nulls
        self.count += len(values)
        self.distinct.add_all(values)
        return True

    def profile(self) -> ColumnProfile:
        """The column's profile as the summary reports it."""
        numbers = self.numbers
        kind: Kind = "empty" if self.count == 0 else "text" if numbers is None else "numeric"
        text = kind == "text"
        numeric = numbers if kind == "numeric" else None
        return ColumnProfile(
            name=self.name, kind=kind, count=self.count, nulls=self.nulls,
            distinct=self.distinct.estimate(), distinct_exact=self.distinct.exact,
            min=numeric.minimum if numeric else None, max=numeric.maximum if numeric else None,
            mean=numeric.mean(self.count) if numeric else None,
            top=[TopValue(v, n) for v, n in self.top.top(self.top_k)] if text else None,
            top_error_max=self.top.error if text else 0)
