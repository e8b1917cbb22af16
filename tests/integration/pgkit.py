"""PostgreSQL for the tests: the server from MULTIFLOW_TEST_POSTGRES, a schema per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

URL = os.environ.get("MULTIFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def server_or_skip() -> None:
    """Skip without a server; in CI (CI=true) a missing server fails the run instead."""
    try:
        with psycopg.connect(URL, connect_timeout=3):
            pass
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {URL} is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {URL}: {exc}")


def store_url(schema: str) -> str:
    """The store URL of one schema of the test server."""
    sep = "&" if "?" in URL else "?"
    return f"{URL}{sep}schema={schema}"


async def fresh_schema(prefix: str) -> AsyncIterator[str]:
    """A schema name no one uses; dropped afterwards."""
    server_or_skip()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
