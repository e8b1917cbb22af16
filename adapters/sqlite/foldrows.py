"""The `jobs` rows of fastfold's job states: what `job_row` makes of the kernel's Job.

The body is `Job`'s JSON: the state is encoded through `_Body`, a positional, mutable
struct with `Job`'s own fields (same names, order and types, so the same bytes).

The rebuild's worker processes import this module without the `adapters` package (whose
`__init__` loads the whole application): it imports only fastfold and the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from adapters.sqlite.fastfold import (
    CHANNEL,
    CREATED_AT,
    CREATED_SEQ,
    CURRENT,
    DEFAULTS,
    ERROR_FOLDER,
    FIELDS,
    FILE,
    ID,
    KEY,
    PRIORITY,
    PROCESSING,
    SEQ,
    STATUS,
    UPDATED_AT,
    VERSION,
    WORKFLOW,
    State,
)
from kernel import layout

Row = tuple[Any, ...]  # a `jobs` row as sqlite3 parameters, in JOB_COLUMNS order
_Body = msgspec.defstruct("Job", [(field.name, field.type) for field in FIELDS])
_encode = msgspec.json.Encoder().encode
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(at: datetime) -> int:
    """`adapters.sqlrows.micros`, which this module may not import (see above); the property
    test compares every row with the one `job_row` makes."""
    return (at - _EPOCH) // _MICROSECOND


class RowMaker:
    """Makes rows; remembers each workflow's archive folder per UTC day."""

    def __init__(self) -> None:
        self._archive_folders: dict[tuple[str, int], str | None] = {}

    def rows(self, states: Iterable[State]) -> list[Row]:
        """The states' rows, as sqlite3 parameters in JOB_COLUMNS order."""
        return [(state[ID], state[WORKFLOW], state[FILE], state[STATUS], state[CHANNEL],
                 state[PRIORITY], state[KEY], micros(state[CREATED_AT]),
                 micros(state[UPDATED_AT]), state[CREATED_SEQ], state[SEQ], state[VERSION],
                 self.body(state).decode())
                for state in states]

    def rows_with_bytes(self, states: Iterable[State]) -> list[Row]:
        """The states' rows, the body as UTF-8 bytes (stored with CAST(? AS TEXT))."""
        body = self.body
        return [(state[ID], state[WORKFLOW], state[FILE], state[STATUS], state[CHANNEL],
                 state[PRIORITY], state[KEY], micros(state[CREATED_AT]),
                 micros(state[UPDATED_AT]), state[CREATED_SEQ], state[SEQ], state[VERSION],
                 body(state))
                for state in states]

    def body(self, state: State) -> bytes:
        """The `body` column: the job as `Job`'s JSON."""
        body = _Body(*state)
        current = state[CURRENT]
        if current.__class__ is not str:
            body.current_path = (  # type: ignore[attr-defined]
                layout.processing_path(body) if current is PROCESSING  # type: ignore[arg-type]
                else layout.error_path(body) if current is ERROR_FOLDER  # type: ignore[arg-type]
                else self._archive_path(body, current))
        return _encode(body)

    def _archive_path(self, body: Any, at: datetime) -> str:
        # layout.archive_path formats the day field by field, a third of a row's cost. The
        # folder is the same for every job of a workflow completed on one UTC day, so the
        # kernel is asked once per (workflow, day) and the job's own name is appended (the
        # property test fails if the kernel's path ever depends on more than these).
        key = (body.workflow_name, at.toordinal())
        if at.tzinfo is not UTC:
            folder = None
        elif key in self._archive_folders:
            folder = self._archive_folders[key]
        else:
            folder = self._archive_folders[key] = _archive_folder(body.workflow_name, at)
        if folder is None:
            return layout.archive_path(body, at)
        return folder + layout.stored_name(body)


def _archive_folder(workflow_name: str, at: datetime) -> str | None:
    """The archive path up to the job's stored name, if the kernel's path ends with it."""
    stub = _Body(*DEFAULTS)
    stub.id, stub.workflow_name, stub.file_path = "\x01id", workflow_name, "\x01name"  # type: ignore[attr-defined]
    path, name = layout.archive_path(stub, at), layout.stored_name(stub)  # type: ignore[arg-type]
    return path[:-len(name)] if path.endswith(name) else None
