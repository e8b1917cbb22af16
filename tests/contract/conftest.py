"""Fixtures of the EventStore contract: one `store` per backend, `reopen` for stores that persist.

Adding a backend is one entry in BACKENDS: a name, an opener and whether it persists.
The opener gets a path unique to the test (a store that does not live in a file,
such as Postgres, can derive a schema or database name from it).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from adapters.memory import MemoryEventStore
from kernel.ports import EventStore

# Hypothesis caches into ./.hypothesis/ even without an example database, and the
# `norecursedirs` of pyproject.toml replaces pytest's defaults: the next run then fails
# at collection on Hypothesis's warning about that folder (filterwarnings = error).
# Until norecursedirs lists ".hypothesis", keep the cache out of the source tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "multiflow-hypothesis")

Opener = Callable[[Path], Awaitable[EventStore]]
Reopen = Callable[[], Awaitable[EventStore]]
FreshStore = Callable[[], AbstractAsyncContextManager[EventStore]]


async def open_memory(path: Path) -> EventStore:
    """A new in-memory store; `path` is unused."""
    return MemoryEventStore()


def require_sqlite() -> None:
    """Skip while the SQLite adapter does not exist yet."""
    try:
        from adapters.sqlite import SqliteEventStore  # noqa: F401
    except ImportError as exc:
        # Only a missing adapter skips; a broken import inside it is a failure.
        if exc.name not in {"adapters.sqlite", "adapters.sqlite.store"}:
            raise
        pytest.skip("sqlite store not importable yet")


async def open_sqlite(path: Path) -> EventStore:
    """The SQLite store on `path`."""
    from adapters.sqlite import SqliteEventStore

    return await SqliteEventStore.open(path)


def postgres_url() -> str:
    """The server the PostgreSQL tests use (MULTIFLOW_TEST_POSTGRES, default local trust auth)."""
    return os.environ.get("MULTIFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def require_postgres() -> None:
    """Skip with a reason when no PostgreSQL answers; in CI a missing server is a failure."""
    try:
        import psycopg

        with psycopg.connect(postgres_url(), connect_timeout=3):
            pass
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {postgres_url()} is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {postgres_url()}: {exc}")


async def open_postgres(path: Path) -> EventStore:
    """The PostgreSQL store in a schema named after the test's path (dropped at session end)."""
    from adapters.postgres import PostgresEventStore

    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    name = f"mf_test_{digest}"
    _SCHEMAS.add(name)
    return await PostgresEventStore.open(f"{postgres_url()}?schema={name}")


_SCHEMAS: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def drop_test_schemas() -> Iterator[None]:
    """Drop the schemas the PostgreSQL tests made."""
    yield
    if not _SCHEMAS:
        return
    import psycopg

    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        for name in _SCHEMAS:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def nothing_required() -> None:
    """The backend needs nothing beyond the project itself."""


@dataclass(frozen=True)
class Backend:
    """One EventStore implementation under the contract."""

    name: str
    open: Opener
    persistent: bool  # its data survives close() and a new open() of the same path
    require: Callable[[], None] = nothing_required  # skips the backend's tests when unavailable


BACKENDS = (
    Backend("memory", open_memory, persistent=False),
    Backend("sqlite", open_sqlite, persistent=True, require=require_sqlite),
    Backend("postgres", open_postgres, persistent=True, require=require_postgres),
)


class OpenStore:
    """The store under test and the path it reopens from; closes whatever is open."""

    def __init__(self, backend: Backend, path: Path) -> None:
        self.backend = backend
        self.path = path
        self.store: EventStore | None = None

    async def open(self) -> EventStore:
        """Open the backend on this path."""
        self.store = await self.backend.open(self.path)
        return self.store

    async def reopen(self) -> EventStore:
        """Close the current store and open the same path again."""
        await self.close()
        return await self.open()

    async def close(self) -> None:
        """Close the open store, once."""
        store, self.store = self.store, None
        if store is not None:
            await store.close()


@pytest.fixture(params=BACKENDS, ids=lambda backend: backend.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    chosen: Backend = request.param
    chosen.require()
    return chosen


@pytest.fixture
async def opened(backend: Backend, tmp_path: Path) -> AsyncIterator[OpenStore]:
    handle = OpenStore(backend, tmp_path / "multiflow.db")
    await handle.open()
    try:
        yield handle
    finally:
        await handle.close()


@pytest.fixture
def store(opened: OpenStore) -> EventStore:
    """The store as opened for the test; after `reopen()`, use the store it returns."""
    assert opened.store is not None
    return opened.store


@pytest.fixture
def reopen(backend: Backend, opened: OpenStore) -> Reopen:
    """Close the test's store and open its path again; skips for stores that do not persist."""
    if not backend.persistent:
        pytest.skip(f"the {backend.name} store does not persist")
    return opened.reopen


@pytest.fixture
def fresh_store(backend: Backend, tmp_path: Path) -> FreshStore:
    """Open a new, empty store of the backend per use (one per hypothesis example)."""
    counter = itertools.count()

    @asynccontextmanager
    async def fresh() -> AsyncIterator[EventStore]:
        handle = OpenStore(backend, tmp_path / f"fresh-{next(counter)}.db")
        try:
            yield await handle.open()
        finally:
            await handle.close()

    return fresh
