"""The Clock and Entropy ports for real use: wall-clock UTC time and sortable ids."""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import UTC, datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class SystemClock:
    """Wall-clock UTC time."""

    def now(self) -> datetime:
        """The current UTC time, timezone-aware."""
        return datetime.now(UTC)


class UlidEntropy:
    """ULID-style ids: 48 bits of milliseconds then 80 random bits, monotonic per process.

    Ids made in the same millisecond increase by one, so sorting ids sorts by creation.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8)))
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new_id(self) -> str:
        """A new 26-character id."""
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms, rand = self._last_ms, self._last_rand + 1
            else:
                rand = self._random.getrandbits(80)
            self._last_ms, self._last_rand = ms, rand
        return _base32((ms << 80) | (rand & ((1 << 80) - 1)))

    def random(self) -> float:
        """A sample in [0, 1)."""
        return self._random.random()


# Ten bits at a time: two characters of Crockford's alphabet per lookup.
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
_SHIFTS = tuple(range(120, -1, -10))


def _base32(value: int) -> str:
    # 128 bits as 26 characters of Crockford's alphabet, most significant first, the last
    # character padded with two zero bits (RFC 4648 base32 of the 16 bytes, as the ids
    # made so far are). The alphabet's ASCII order keeps the ids sortable.
    padded = value << 2
    return "".join([_PAIRS[(padded >> shift) & 1023] for shift in _SHIFTS])
