"""SIGTERM on the real server: readiness drops, running jobs get the grace period, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2

from tests.e2e.serverkit import Server, place, unique

GRACE_S = 3.0


def _slow_job(server: Server, client: httpx2.Client, seconds: float) -> str:
    name = place(server, "slow", unique(f"slow{seconds:g}"))
    made = client.post("/api/slow/process", json={"file_path": name, "seconds": seconds})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def _job_row(server: Server, job_id: str) -> dict[str, Any]:
    body = server.sql(f"SELECT body FROM jobs WHERE id = '{job_id}'")[0][0]
    return dict(json.loads(body))


def _readyz_while_running(server: Server) -> list[tuple[int, bool]]:
    """(status, accepting) of /readyz, polled until the server stops answering."""
    answers: list[tuple[int, bool]] = []
    with server.anonymous(timeout=2.0) as client:
        while server.proc.poll() is None and len(answers) < 400:
            try:
                ready = client.get("/readyz")
            except httpx2.TransportError:
                break  # the listener closed: the drain is over
            checks = {c["name"]: c["ok"] for c in ready.json()["checks"]}
            answers.append((ready.status_code, checks["accepting"]))
            time.sleep(0.05)
    return answers


def test_sigterm_drains_finishes_short_jobs_and_interrupts_long_ones(
        start_server: Callable[..., Server]) -> None:
    """During the grace period /readyz is 503; a short job completes, a long one is Interrupted."""
    server = start_server(concurrency="2", drain_grace_s=str(GRACE_S), watchers="false")
    with server.client() as client:
        short_id = _slow_job(server, client, 1.5)
        long_id = _slow_job(server, client, 60)
    server.wait_job(short_id, ("running",))
    server.wait_job(long_id, ("running",))
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    answers = _readyz_while_running(server)
    assert server.proc.wait(GRACE_S + 15) == 0, server.log_text()[-3000:]
    elapsed_s = time.monotonic() - started
    # The signal is delivered asynchronously: a request already in flight when it lands
    # may still be answered 200; from the first 503 on, every answer must be 503.
    assert (503, False) in answers, answers
    after = answers[answers.index((503, False)):]
    assert set(after) == {(503, False)}, answers
    assert answers.index((503, False)) <= 2, answers
    assert GRACE_S - 0.5 <= elapsed_s < GRACE_S + 8, elapsed_s
    short, long = _job_row(server, short_id), _job_row(server, long_id)
    assert short["status"] == "completed", short
    assert long["status"] == "failed", long
    assert long["error"]["type"] == "Interrupted", long
    kinds = [row[0] for row in server.sql(
        f"SELECT type FROM events WHERE job_id = '{long_id}' ORDER BY version")]
    assert kinds[-1] == "job.failed"
    error_dir = server.data_dir / "slow" / "error"
    assert any(p.name.startswith(long_id) for p in error_dir.iterdir())


def test_sigterm_with_no_running_job_exits_at_once(start_server: Callable[..., Server]) -> None:
    """With nothing running, SIGTERM exits 0 well before the grace period ends."""
    server = start_server(drain_grace_s="30", watchers="false")
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 3.0


def test_sigterm_ends_open_event_streams_promptly(start_server: Callable[..., Server]) -> None:
    """An open /api/events stream does not delay the exit; the stream ends."""
    server = start_server(drain_grace_s="30", watchers="false")
    ended = threading.Event()

    def listen() -> None:
        try:
            with server.client(timeout=30) as client, \
                    client.stream("GET", "/api/events") as answer:
                for _ in answer.iter_lines():
                    pass
        except httpx2.HTTPError:
            pass
        ended.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert server.stop() == 0
    exit_s = time.monotonic() - started
    assert exit_s < 3.0, exit_s
    assert ended.wait(1)
