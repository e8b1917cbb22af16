"""Bounded-memory sketches: distinct values (KMV) and frequent values (Misra-Gries).

Both take a chunk's `Counter` of values, so each distinct value of a chunk costs one
step however often it repeats, and both keep a fixed number of entries per column.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Mapping
from operator import itemgetter

HASH_OFFSET = 1 << 63  # hash() of a str is a signed 64-bit number on 64-bit builds
HASH_SPAN = float(1 << 64)


class DistinctSketch:
    """K minimum values of 64-bit hashes: exact below `k` distinct values, ~1/sqrt(k) above.

    It uses Python's own string hash (SipHash, randomised per process), so an estimate
    may differ by a fraction of its error between runs; it never needs a second pass.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._kept = array("q")  # the k smallest hashes merged so far, sorted, 8 bytes each
        self._fresh: list[int] = []  # hashes under the threshold, not merged yet
        self._threshold = HASH_OFFSET  # above every hash until k are kept

    def add_all(self, values: Iterable[str]) -> None:
        """Add distinct values (a chunk's Counter keys); merging waits for k candidates."""
        self._fresh += filter(self._threshold.__gt__, map(hash, values))  # C speed, no bytecode
        if len(self._fresh) >= self.k:
            self._merge()

    def _merge(self) -> None:
        merged = set(self._kept)
        merged.update(self._fresh)
        self._fresh = []
        self._kept = array("q", sorted(merged)[: self.k])  # a C-level sort beats a heap loop
        if len(self._kept) == self.k:
            self._threshold = self._kept[-1]

    @property
    def exact(self) -> bool:
        """Whether fewer than k distinct values were seen, so the count is exact."""
        self._merge()
        return len(self._kept) < self.k

    def estimate(self) -> int:
        """The number of distinct values: (k - 1) / (the k-th smallest hash in 0..1)."""
        if self.exact:
            return len(self._kept)
        kth = (self._kept[-1] + HASH_OFFSET + 1) / HASH_SPAN
        return round((self.k - 1) / kth)


class TopValues:
    """Misra-Gries frequent values with `capacity` counters (mergeable chunk by chunk).

    A count is never over the truth and is short by at most `error`, which stays below
    N / (capacity + 1) for N values seen; `error` is 0 while no counter was dropped.
    """

    def __init__(self, capacity: int, value_chars_max: int) -> None:
        self.capacity = capacity
        self.value_chars_max = value_chars_max
        self.counts: dict[str, int] = {}
        self.error = 0

    def add_counts(self, chunk: Mapping[str, int]) -> None:
        """Merge a chunk's exact counts: reduce the chunk first, so its rare values cost little."""
        reduced, self.error = _reduce(chunk, self.capacity, self.error)
        counts, chars_max = self.counts, self.value_chars_max
        for value, n in reduced.items():  # at most `capacity` values
            key = value if len(value) <= chars_max else value[:chars_max]
            counts[key] = counts.get(key, 0) + n
        self.counts, self.error = _reduce(counts, self.capacity, self.error)

    def missed(self, values: int) -> None:
        """Record `values` that were not counted: any count may now be short by that many."""
        self.error += values

    def top(self, k: int) -> list[tuple[str, int]]:
        """The k most frequent values, most frequent first, ties by value."""
        ranked = sorted(self.counts.items(), key=itemgetter(0))
        return heapq.nlargest(k, ranked, key=itemgetter(1))


def _reduce(counts: Mapping[str, int], capacity: int, error: int) -> tuple[dict[str, int], int]:
    """Misra-Gries reduction: subtract the (capacity+1)-th largest count, drop what reaches 0."""
    if len(counts) <= capacity:
        return dict(counts), error
    ranked = sorted(counts.values(), reverse=True)  # a C-level sort, not a heap loop
    cut = ranked[capacity]
    if ranked[0] <= cut:  # all alike (a column of unique values): nothing survives
        return {}, error + cut
    return {value: n - cut for value, n in counts.items() if n > cut}, error + cut
