"""The parameters of a csv_summary job and the profile it writes."""

from __future__ import annotations

import codecs
from typing import Annotated, Literal

import msgspec

from kernel.task import BaseTask

Kind = Literal["numeric", "text", "empty"]


class Task(BaseTask):
    """How to read the CSV and how many top values to report per text column."""

    delimiter: Annotated[str, msgspec.Meta(min_length=1, max_length=1)] = ","
    encoding: Annotated[str, msgspec.Meta(min_length=1, max_length=40)] = "utf-8"
    has_header: bool = True
    top_k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10

    def __post_init__(self) -> None:
        if self.delimiter in ('"', "\r", "\n"):
            raise ValueError(f"delimiter {self.delimiter!r} cannot separate CSV fields")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r}") from None


class TopValue(msgspec.Struct, frozen=True):
    """A frequent value and its count (a lower bound when the column's top_error_max > 0)."""

    value: str
    count: int


class ColumnProfile(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One column: `count` non-empty cells plus `nulls` empty ones make the row count."""

    name: str
    kind: Kind
    count: int
    nulls: int
    distinct: int  # exact when distinct_exact, else a KMV estimate
    distinct_exact: bool
    min: int | float | None = None  # numeric columns only; integers when every value is one
    max: int | float | None = None
    mean: float | None = None
    top: list[TopValue] | None = None  # text columns only
    top_error_max: int = 0  # each top count may be short by at most this much


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """The profile of one CSV file, written to output/{name}.summary.json."""

    file: str
    size_bytes: int
    rows: int
    short_rows: int  # rows with fewer fields than the header; the missing cells count as nulls
    delimiter: str
    encoding: str
    has_header: bool
    columns: list[ColumnProfile]
