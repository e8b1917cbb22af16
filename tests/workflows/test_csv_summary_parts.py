"""The parts of csv_summary: its bounded sketches against exact counts, its chunk sizing."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.csv_summary.config import CHUNK_BYTES
from workflows.csv_summary.processor import _next_chunk_rows
from workflows.csv_summary.services.profile import ColumnStats
from workflows.csv_summary.utils.sketches import DistinctSketch, TopValues

values = st.lists(st.lists(st.sampled_from([f"v{i}" for i in range(40)]) | st.text(max_size=3),
                           max_size=60), max_size=12)


@given(values, st.integers(min_value=1, max_value=12))
@settings(max_examples=200, deadline=None)
def test_misra_gries_counts_are_lower_bounds_within_the_error(
        chunks: list[list[str]], capacity: int) -> None:
    """Each kept count is <= the truth and >= truth - error; a value over the error is kept."""
    top, truth = TopValues(capacity, value_chars_max=100), Counter[str]()
    for chunk in chunks:
        top.add_counts(Counter(chunk))
        truth.update(chunk)
    assert len(top.counts) <= capacity
    assert top.error <= sum(truth.values()) // (capacity + 1) * 2
    for value, true_count in truth.items():
        kept = top.counts.get(value, 0)
        assert true_count - top.error <= kept <= true_count


@given(st.lists(st.lists(st.integers(0, 10_000).map(str), max_size=300), max_size=8))
@settings(max_examples=100, deadline=None)
def test_kmv_is_exact_below_k(chunks: list[list[str]]) -> None:
    """Below k distinct values the sketch counts exactly, whatever the chunking."""
    sketch, seen = DistinctSketch(k=4096), set()
    for chunk in chunks:
        sketch.add_all(Counter(chunk))
        seen.update(chunk)
    assert sketch.exact and sketch.estimate() == len(seen)


def test_kmv_estimates_many_values_within_six_percent() -> None:
    """200k distinct values with duplicates, in chunks: the estimate is within the stated error."""
    sketch = DistinctSketch(k=4096)
    for start in range(0, 200_000, 25_000):
        sketch.add_all([f"id-{i}" for i in range(start, start + 25_000)] * 2)
    assert not sketch.exact
    assert abs(sketch.estimate() - 200_000) <= 0.06 * 200_000


def test_a_numeric_column_that_turns_text_late_reports_an_honest_error() -> None:
    """Unique ints skip counting; a word in a later chunk makes the column text, error bounded."""
    stats = ColumnStats("id", top_k=3, top_counters=64)
    stats.add([str(i) for i in range(1000)])  # counted, mostly unique: sparse from now on
    stats.add([str(i) for i in range(1000, 2000)])  # taken without a Counter
    stats.add(["x", "x", "7", ""])
    profile = stats.profile()
    assert (profile.kind, profile.count, profile.nulls) == ("text", 2003, 1)
    assert profile.top is not None and profile.top[0].value == "x"
    assert profile.top[0].count == 2 and profile.top_error_max >= 2000


def test_nan_and_inf_make_a_column_text() -> None:
    """nan, inf and -inf parse as floats but are not numbers for a profile."""
    for words in (["1.5", "nan"], ["inf", "-inf"], ["2", "-Infinity"]):
        stats = ColumnStats("x", top_k=3, top_counters=64)
        stats.add(words)
        assert stats.profile().kind == "text", words


def test_integers_stay_exact_beyond_float_precision() -> None:
    """Integer columns sum as ints: 2**60 + 1 keeps its last unit in min, max and the mean."""
    stats = ColumnStats("big", top_k=3, top_counters=64)
    stats.add([str(2**60 + 1), str(2**60 + 3)])
    profile = stats.profile()
    assert (profile.min, profile.max) == (2**60 + 1, 2**60 + 3)
    assert profile.mean == float(2**60 + 2)


def test_rows_of_long_fields_make_small_chunks() -> None:
    """A chunk holds about CHUNK_BYTES of text: 100 KB rows give a few dozen rows, not 11k."""
    assert _next_chunk_rows(11_111, rows=64, bytes_read=64 * 100_000) == CHUNK_BYTES // 100_000
    assert _next_chunk_rows(11_111, rows=64, bytes_read=64 * 60) == 11_111
    assert _next_chunk_rows(11_111, rows=1, bytes_read=10 * CHUNK_BYTES) == 1
