"""Fixtures for the end-to-end suite: the real server on loopback (see serverkit.py).

`server` is one process for the whole session, with watchers off (a file placed in
input/ becomes a job only through the API), a generous rate limit and 64 KiB uploads.
`start_server` starts servers of a test's own, with its own settings (rate limits,
SIGTERM). When a test fails, the logs of the servers it used are printed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.serverkit import Server, launch

MAIN_SETTINGS = {
    "watchers": "false",
    "concurrency": "2",
    "rate_limit_per_s": "10000",
    "rate_limit_burst": "10000",
    "upload_max_bytes": str(64 * 1024),
    "drain_grace_s": "2",
}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash.setdefault(_FAILED, True)
    return report


_FAILED = pytest.StashKey[bool]()


def _print_log_if_failed(request: pytest.FixtureRequest, server: Server) -> None:
    if request.node.stash.get(_FAILED, False):
        sys.stderr.write(f"\n--- server log {server.log_path} (tail) ---\n"
                         f"{server.log_text()[-6000:]}\n")


@pytest.fixture(scope="session")
def main_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = launch(tmp_path_factory.mktemp("server"), **MAIN_SETTINGS)
    yield running
    with contextlib.suppress(Exception):
        running.stop()


@pytest.fixture
def server(main_server: Server, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The session's server; its log is printed if the test fails."""
    assert main_server.proc.poll() is None, "the session server died:\n" + \
        main_server.log_text()[-5000:]
    yield main_server
    _print_log_if_failed(request, main_server)


@pytest.fixture
def start_server(tmp_path: Path, request: pytest.FixtureRequest
                 ) -> Iterator[Callable[..., Server]]:
    """Start a server of the test's own (MULTIFLOW_* settings as keywords); stopped after."""
    started: list[Server] = []

    def start(**settings: str) -> Server:
        running = launch(tmp_path / f"server{len(started)}", **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        _print_log_if_failed(request, running)
        with contextlib.suppress(Exception):
            running.stop(timeout_s=10)
