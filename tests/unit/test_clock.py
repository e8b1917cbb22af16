"""The shell's ids: 26 characters of Crockford's base32 that sort by creation."""

from __future__ import annotations

import pytest

from adapters.clock import UlidEntropy, _base32

ALPHABET = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


@pytest.mark.parametrize(("value", "text"), [
    (0, "0" * 26),
    ((1 << 128) - 1, "Z" * 25 + "W"),  # the last character holds 3 bits and 2 of padding
    (0x0123456789ABCDEF0123456789ABCDEF, "04HMASW9NF6YY0938NKRKAYDXW"),
])
def test_encoding_is_the_one_every_stored_id_has(value: int, text: str) -> None:
    """The bytes of the ids already in logs (RFC 4648 base32 mapped to Crockford)."""
    assert _base32(value) == text


def test_ids_are_unique_sortable_and_well_formed() -> None:
    """Ids made in one burst (most in the same millisecond) increase strictly."""
    entropy = UlidEntropy(seed=7)
    ids = [entropy.new_id() for _ in range(5000)]
    assert all(len(i) == 26 and set(i) <= ALPHABET for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_order_of_values_is_order_of_text() -> None:
    """Comparing ids as text compares the numbers they encode."""
    values = [0, 1, 31, 32, 1 << 80, (1 << 80) + 1, 1 << 127, (1 << 128) - 1]
    assert [_base32(v) for v in values] == sorted(_base32(v) for v in values)
