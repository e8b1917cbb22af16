"""The Clock and Entropy ports for real use: wall-clock UTC time and sortable ids."""

from __future__ import annotations

import base64
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


_TO_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD)


def _base32(value: int) -> str:
    # 128 bits in RFC 4648 base32 (26 characters once the padding goes), then mapped to
    # Crockford's alphabet, whose ASCII order keeps the ids sortable.
    text = base64.b32encode(value.to_bytes(16, "big")).decode("ascii").rstrip("=")
    return text.translate(_TO_CROCKFORD)
