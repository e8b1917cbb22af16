"""The rebuild's own fold (adapters/sqlite/fastfold.py) against the kernel's fold.

`multiflow rebuild` does not call `kernel.state`: it folds with a faster copy of its own
and makes the rows without `job_row`. These tests run the real rebuild on logs generated
from the kernel's event classes themselves (every type, every field varied, so a new
field or event type is generated without touching this file) and compare every row,
typed and byte for byte, with `job_row` of `kernel.state.replay`: on each of its paths
(job order in this thread or in worker processes, seq order), from an empty table and
from a table of stale rows.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import sqlrows
from adapters.sqlite import fastfold, rebuild, rebuild_worker, schema
from adapters.sqlite.rebuild import rebuild_read_model
from adapters.sqlrows import JOB_COLUMNS, job_row
from kernel.events import (
    EVENT_TYPES,
    AnyEvent,
    Event,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobRetried,
    JobStarted,
    encode_event,
    event_tag,
)
from kernel.ports import StoreError
from kernel.state import StoredEvent, replay

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ZONES = (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30)))
# Strings the rows must carry unchanged: quotes, escapes, NUL, beyond the BMP.
TEXT = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(
    ["", "a\x00b", '"\\/', "\u2028é😀", "wf/input/x.pdf"])
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
MOMENTS = st.builds(lambda base, zone: base.replace(tzinfo=UTC).astimezone(zone),
                    st.datetimes(datetime(1990, 1, 1), datetime(2200, 1, 1)),
                    st.sampled_from(ZONES))


def strategy_of(kind: mi.Type) -> st.SearchStrategy[Any]:
    """Values for a field of this msgspec type; a type not known here fails loudly."""
    match kind:
        case mi.StrType():
            return TEXT
        case mi.IntType():
            return st.integers(-2**63, 2**63 - 1)
        case mi.FloatType():
            return st.floats(allow_nan=False, allow_infinity=False)
        case mi.DateTimeType():
            return MOMENTS
        case mi.NoneType():
            return st.none()
        case mi.UnionType(types=types):
            return st.one_of([strategy_of(member) for member in types])
        case mi.DictType(key_type=key, value_type=value):
            return st.dictionaries(strategy_of(key), strategy_of(value), max_size=3)
        case mi.ListType(item_type=item):
            return st.lists(strategy_of(item), max_size=3)
        case mi.AnyType():
            return JSON_VALUES
    raise TypeError(f"no strategy for a field of type {kind}: extend strategy_of")


def events_of(kind: type[Event], job_id: str) -> st.SearchStrategy[Event]:
    """Any event of this class for this job, every field drawn (defaults included)."""
    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType)
    fields = {field.name: strategy_of(field.type) for field in info.fields}
    fields["job_id"] = st.just(job_id)
    return st.fixed_dictionaries(fields).map(lambda values: kind(**values))


LATER = [kind for kind in EVENT_TYPES if kind is not JobCreated]


@st.composite
def logs(draw: st.DrawFn) -> list[StoredEvent]:
    """A log of a few jobs: each created, then any events in any order, interleaved."""
    ids = draw(st.lists(TEXT.filter(bool), min_size=1, max_size=5, unique=True))
    per_job = {}
    for number, job_id in enumerate(ids):
        later = st.sampled_from(LATER).flatmap(lambda kind, job_id=job_id: events_of(kind, job_id))
        per_job[job_id] = [own_file(draw(events_of(JobCreated, job_id)), number),
                           *draw(st.lists(later, max_size=7))]
    order = draw(st.permutations([job_id for job_id, evs in per_job.items() for _ in evs]))
    return stamp([(job_id, per_job[job_id].pop(0)) for job_id in order])


def own_file(event: Event, number: int) -> Event:
    """A JobCreated with a file and an idempotency key no other job has: the store refuses
    a second active job on one file and a reused key, and so do the read model's indexes."""
    assert isinstance(event, JobCreated)
    key = event.idempotency_key
    return msgspec.structs.replace(event, file_path=f"{event.file_path}/{number}",
                                   idempotency_key=None if key is None else f"{key}/{number}")


def stamp(log: list[tuple[str, Event]]) -> list[StoredEvent]:
    """Give each event its seq (from 1) and its job's next version."""
    versions: dict[str, int] = {}
    stored = []
    for seq, (job_id, event) in enumerate(log, start=1):
        versions[job_id] = versions.get(job_id, 0) + 1
        stored.append(StoredEvent(seq=seq, job_id=job_id, version=versions[job_id],
                                  event=event))  # type: ignore[arg-type]
    return stored


@contextmanager
def sqlite_log(stored: list[StoredEvent]) -> Iterator[tuple[sqlite3.Connection, Path]]:
    """A SQLite store file holding exactly this log (written directly, not appended)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.db"
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # nothing here must survive a power cut
            schema.migrate(conn)
            conn.executemany(
                "INSERT INTO events (seq, job_id, version, type, at, payload, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, '')",
                [(s.seq, s.job_id, s.version, event_tag(s.event), s.event.at.isoformat(),
                  encode_event(s.event).decode()) for s in stored])
            yield conn, path
        finally:
            conn.close()


def typed(rows: list[tuple[Any, ...]]) -> list[tuple[tuple[str, Any], ...]]:
    """Rows with each value's type beside it: 1 and 1.0 (or 1 and '1') must not pass as equal."""
    return [tuple((type(value).__name__, value) for value in row) for row in rows]


def rebuilt(stored: list[StoredEvent]) -> list[tuple[Any, ...]]:
    """The `jobs` rows the real rebuild writes for this log, by id."""
    with sqlite_log(stored) as (conn, path):
        rebuild_read_model(conn, path)
        return conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id").fetchall()


def folded(stored: list[StoredEvent]) -> list[tuple[Any, ...]]:
    """The rows of the kernel's fold, by id: the oracle."""
    return sorted((job_row(job) for job in replay(stored).values()), key=lambda row: row[0])


def refuse_job_order(conn: sqlite3.Connection, path: Path, keep_rows: bool) -> tuple[int, int]:
    raise rebuild._SeqOrder("forced by the test")


@pytest.fixture(params=["job-order-tiny", "job-order", "seq-tiny", "seq-small", "seq-default"])
def paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each path of the rebuild, with batches that end inside a job or hold many jobs.

    Job order in this thread (the path of logs under WORKER_EVENTS_MIN events): chunks of
    one event (a job held across chunks) and frames of one row. Seq order (forced): tiny
    batches hand finished jobs to the writer early, so later events revive them."""
    if request.param.startswith("job-order"):
        if request.param.endswith("tiny"):
            monkeypatch.setattr(rebuild_worker, "CHUNK_EVENTS", 1)
            monkeypatch.setattr(rebuild_worker, "FRAME_ROWS", 1)
        return
    chunk, held = {"seq-tiny": (1, 1), "seq-small": (2, 3), "seq-default": (20_000, 10_000)}[
        request.param]
    monkeypatch.setattr(rebuild, "_rebuild_by_job", refuse_job_order)
    monkeypatch.setattr(rebuild, "CHUNK_EVENTS", chunk)
    monkeypatch.setattr(rebuild, "HELD_JOBS_MIN", held)


@pytest.mark.usefixtures("paths")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(logs())
def test_rebuild_writes_the_rows_of_the_kernel_fold(stored: list[StoredEvent]) -> None:
    """On any log, the rebuilt rows equal `job_row` of the kernel's replay, typed and exact."""
    assert typed(rebuilt(stored)) == typed(folded(stored))


def test_every_event_the_log_can_hold_is_generated() -> None:
    """The generator draws from EVENT_TYPES; every class the log decodes to is in it."""
    assert set(typing.get_args(AnyEvent)) == set(EVENT_TYPES) == {JobCreated, *LATER}


def test_the_seeded_simulation_logs_rebuild_to_the_kernel_fold() -> None:
    """The logs of the manager's simulation (faults, crash, recovery) rebuild exactly too."""
    from tests.property.sim import VirtualTimeLoop
    from tests.property.test_simulation import EVERYTHING, simulate

    async def log_of(seed: int) -> list[StoredEvent]:
        sim = await simulate(seed)
        return await sim.store.read_all(0, EVERYTHING)

    for seed in (1, 6, 11):
        stored = anyio.run(log_of, seed, backend="asyncio",
                           backend_options={"loop_factory": VirtualTimeLoop})
        assert typed(rebuilt(stored)) == typed(folded(stored)), f"seed {seed}"


def created(job_id: str, name: str = "a.pdf") -> JobCreated:
    return JobCreated(job_id=job_id, at=T0, workflow_name="wf", file_path=f"wf/input/{name}")


def test_a_nul_in_a_column_arrives_whole() -> None:
    """A NUL inside an id, a path or a worker's name is kept, in the columns and the body."""
    stored = stamp([("j\x00", created("j\x00", "a\x00.pdf")),
                    ("j\x00", JobStarted(job_id="j\x00", at=T0, attempt=1, worker="n\x00"))])
    rows = rebuilt(stored)
    assert typed(rows) == typed(folded(stored))
    assert rows[0][0] == "j\x00" and rows[0][2] == "wf/input/a\x00.pdf"


@pytest.mark.parametrize("log, message", [
    ([("j1", JobStarted(job_id="j1", at=T0, attempt=1))], "before its JobCreated"),
    ([("j1", created("j1")), ("j1", created("j1"))], "JobCreated of job j1 stored as version 2"),
], ids=["no-creation", "created-twice"])
def test_a_log_the_kernel_cannot_fold_is_refused(log: list[tuple[str, Event]],
                                                 message: str) -> None:
    """Where the kernel's fold raises, the rebuild raises a StoreError and keeps the old rows."""
    stored = stamp(log)
    with pytest.raises(ValueError):
        replay(stored)
    with sqlite_log(stored) as (conn, path):
        # A stale row of j1 from before: the rebuild must not go on from it.
        stale = job_row(replay(stamp([("j1", created("j1"))]))["j1"])
        conn.execute(f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 13)})", stale)
        with pytest.raises(StoreError, match=message):
            rebuild_read_model(conn, path)
        assert conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs").fetchall() == [stale]


def test_a_version_out_of_step_is_refused() -> None:
    """A stored version that is not the job's next one fails the rebuild, as it fails `apply`."""
    stored = stamp([("j1", created("j1")), ("j1", JobStarted(job_id="j1", at=T0, attempt=1))])
    stored[1] = msgspec.structs.replace(stored[1], version=3)
    with pytest.raises(ValueError):
        replay(stored)
    with sqlite_log(stored) as (conn, path), pytest.raises(StoreError, match="version 3"):
        rebuild_read_model(conn, path)


def test_a_failure_in_the_writer_thread_rolls_the_rebuild_back() -> None:
    """Two active jobs on one file break a unique index: the writer's error surfaces, nothing
    changes."""
    stored = stamp([("j1", created("j1")), ("j2", created("j2"))])
    with sqlite_log(stored) as (conn, path):
        conn.execute("PRAGMA secure_delete = 1")
        with pytest.raises(sqlite3.IntegrityError):
            rebuild_read_model(conn, path)
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert conn.execute("PRAGMA secure_delete").fetchone() == (1,)  # set back


def test_finished_jobs_revived_later_are_read_back_from_the_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In seq order, a job written as failed, then retried by an operator, is read back and
    folded on."""
    monkeypatch.setattr(rebuild, "_rebuild_by_job", refuse_job_order)
    monkeypatch.setattr(rebuild, "CHUNK_EVENTS", 1)
    monkeypatch.setattr(rebuild, "HELD_JOBS_MIN", 1)
    loads: list[str] = []
    real_state_of = fastfold.state_of
    monkeypatch.setattr(fastfold, "state_of", lambda job: loads.append(job.id) or
                        real_state_of(job))
    stored = stamp([("j1", created("j1")),
                    ("j1", JobFailed(job_id="j1", at=T0, error_type="TooLarge", message="big")),
                    ("j2", created("j2", "b.pdf")),
                    ("j1", JobRetried(job_id="j1", at=T0, actor="cli")),
                    ("j1", JobStarted(job_id="j1", at=T0, attempt=1)),
                    ("j1", JobCompleted(job_id="j1", at=T0, attempt=1, result={"n": 1}))])
    assert typed(rebuilt(stored)) == typed(folded(stored))
    assert loads == ["j1"]


@pytest.mark.parametrize("variables_max", [250_000, 100], ids=["default", "old-sqlite"])
def test_rows_go_in_statements_of_many_rows_whatever_their_number(variables_max: int) -> None:
    """2,500 rows are all written, also where SQLite allows only 100 variables a statement."""
    stored = stamp([(f"j{n:04d}", created(f"j{n:04d}", f"{n}.pdf")) for n in range(2_500)])
    with sqlite_log(stored) as (conn, path):
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables_max)
        report = rebuild_read_model(conn, path)
        rows = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id").fetchall()
    assert report.jobs == 2_500
    assert typed(rows) == typed(folded(stored))


def test_an_empty_log_empties_the_read_model() -> None:
    """No events, no rows: whatever the table held before is gone."""
    stale = job_row(replay(stamp([("j1", created("j1"))]))["j1"])
    with sqlite_log([]) as (conn, path):
        conn.execute(f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 13)})", stale)
        report = rebuild_read_model(conn, path)
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    assert (report.events, report.jobs) == (0, 0)


# -- the job-order path against a table that is not empty -------------------------------

COLUMN_VALUES = st.none() | st.integers(-3, 3) | TEXT | st.binary(max_size=4) | st.sampled_from(
    ["pending", "running", "completed", "wf"])


@st.composite
def stale_tables(draw: st.DrawFn, stored: list[StoredEvent]) -> list[tuple[Any, ...]]:
    """The rows of the log's fold, some dropped, some with a column changed (any value,
    of any type), and rows of jobs the log does not have."""
    rows = []
    for row in folded(stored):
        action = draw(st.sampled_from(["keep", "keep", "drop", "change"]))
        if action == "drop":
            continue
        if action == "change":
            column = draw(st.integers(1, len(row) - 1))
            row = (*row[:column], draw(COLUMN_VALUES), *row[column + 1:])
        rows.append(row)
    for number in range(draw(st.integers(0, 2))):
        extra = (f"{draw(TEXT)}/extra{number}", *draw(st.sampled_from(folded(stored) or [
            job_row(replay(stamp([("x", created("x"))]))["x"])]))[1:])
        rows.append(extra)
    return rows


def fill(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Put rows in the table as they are (a row the table's constraints refuse is left out)."""
    conn.executemany(f"INSERT OR IGNORE INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                     rows)


def rebuilt_over(stored: list[StoredEvent], stale: list[Any]) -> list[Any]:
    """The rows a rebuild of `stored` leaves in a table that held `stale` rows."""
    with sqlite_log(stored) as (conn, path):
        fill(conn, stale)
        rebuild_read_model(conn, path)
        return conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id").fetchall()


@pytest.mark.parametrize("chunk", [1, 5_000], ids=["tiny", "default"])
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_stale_table_is_made_the_fold_of_the_log(chunk: int, data: st.DataObject,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows missing, rows with any column wrong, rows of no job: the rebuilt table is the
    kernel's fold all the same (also where a stale row holds a file or key a job takes)."""
    monkeypatch.setattr(rebuild_worker, "CHUNK_EVENTS", chunk)
    monkeypatch.setattr(rebuild_worker, "FRAME_ROWS", chunk)
    stored = data.draw(logs())
    stale = data.draw(stale_tables(stored))
    assert typed(rebuilt_over(stored, stale)) == typed(folded(stored))


def test_a_table_that_is_right_is_not_written() -> None:
    """Rebuilding a right read model changes no row: no page written, no WAL to checkpoint."""
    stored = stamp([(f"j{n}", created(f"j{n}", f"{n}.pdf")) for n in range(50)]
                   + [(f"j{n}", JobStarted(job_id=f"j{n}", at=T0, attempt=1)) for n in range(20)])
    with sqlite_log(stored) as (conn, path):
        rebuild_read_model(conn, path)
        before = conn.total_changes
        report = rebuild_read_model(conn, path)
        assert conn.total_changes == before
        rows = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id").fetchall()
    assert (report.events, report.jobs) == (70, 50)
    assert typed(rows) == typed(folded(stored))


def test_a_stale_row_in_the_way_of_a_unique_index_makes_the_table_emptied_first() -> None:
    """A stale row of a finished job says it still holds the file that a newer job holds:
    writing the newer job's row alone would break the unique index; the rebuild empties
    the table and writes every row instead."""
    stored = stamp([("j1", created("j1")),
                    ("j1", JobFailed(job_id="j1", at=T0, error_type="E", message="m")),
                    ("j2", created("j2"))])
    stale = [job_row(replay(stamp([("j1", created("j1"))]))["j1"])]  # j1 still pending
    assert typed(rebuilt_over(stored, stale)) == typed(folded(stored))


# -- worker processes ---------------------------------------------------------------------

@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes for any log, three of them."""
    monkeypatch.setattr(rebuild, "WORKER_EVENTS_MIN", 0)
    monkeypatch.setattr(rebuild, "WORKERS", 3)


@pytest.mark.usefixtures("workers")
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_worker_processes_write_the_rows_of_the_kernel_fold(data: st.DataObject) -> None:
    """The processes' rows, over ranges of ids, on an empty or a stale table, are the fold's."""
    stored = data.draw(logs())
    stale = data.draw(stale_tables(stored))
    assert typed(rebuilt_over(stored, stale)) == typed(folded(stored))


@pytest.mark.usefixtures("workers")
def test_worker_processes_pass_ids_with_a_nul_and_report_a_bad_log() -> None:
    """Ids are sent whole (a NUL too); a log they cannot fold goes to the seq-order fold,
    which names the seq."""
    stored = stamp([(f"j\x00{n}", created(f"j\x00{n}", f"{n}.pdf")) for n in range(30)])
    assert typed(rebuilt(stored)) == typed(folded(stored))
    bad = stamp([("j1", created("j1")), ("j1", JobStarted(job_id="j1", at=T0, attempt=1))])
    bad[1] = msgspec.structs.replace(bad[1], version=3)
    with sqlite_log(bad) as (conn, path), pytest.raises(StoreError, match=r"seq 2.*version 3"):
        rebuild_read_model(conn, path)


@pytest.mark.usefixtures("workers")
def test_a_worker_that_fails_leaves_the_rebuild_to_the_seq_order_fold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that exits without its result: the rebuild still writes the fold's rows."""
    monkeypatch.setattr(rebuild, "worker_command", lambda: [sys.executable, "-c", "pass"])
    stored = stamp([(f"j{n}", created(f"j{n}", f"{n}.pdf")) for n in range(10)])
    assert typed(rebuilt(stored)) == typed(folded(stored))


def test_events_out_of_seq_order_within_a_job_go_to_the_seq_order_fold() -> None:
    """A job's version 2 stored before its version 1: the job-order fold would take it, the
    kernel's does not; the rebuild raises as the kernel's fold does."""
    stored = stamp([("j1", created("j1")), ("j1", JobStarted(job_id="j1", at=T0, attempt=1))])
    stored = [msgspec.structs.replace(stored[0], seq=2), msgspec.structs.replace(stored[1], seq=1)]
    with pytest.raises(ValueError):
        replay(sorted(stored, key=lambda event: event.seq))
    with sqlite_log(stored) as (conn, path), pytest.raises(StoreError, match="seq 1"):
        rebuild_read_model(conn, path)


def test_the_worker_reads_the_columns_the_store_writes() -> None:
    """The worker may not import adapters.sqlrows; its copy of the column list is the same."""
    assert rebuild_worker.JOB_COLUMNS == sqlrows.JOB_COLUMNS
    assert len(sqlrows.JOB_COLUMNS.split(",")) == rebuild_worker.WIDTH
