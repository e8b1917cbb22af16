"""GET /api/events on the real server: the log as Server-Sent Events, resumable, bounded."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx2

from tests.e2e.serverkit import Server, place, unique

SEND_TIMEOUT_S = 10.0  # adapters/http/events.py SEND_TIMEOUT_S


def _some_events(server: Server) -> None:
    """Make sure the log holds a few events (a parked job, cancelled)."""
    with server.client() as client:
        made = client.post("/api/jobs", json={"workflow_name": "parked",
                                              "file_path": place(server, "parked", unique("sse"))})
        client.post(f"/api/jobs/{made.json()['id']}/cancel")


@contextmanager
def _stream(server: Server, **options: object) -> Iterator[Iterator[httpx2.ServerSentEvent]]:
    with server.client(timeout=httpx2.Timeout(10.0, read=5.0)) as client, \
            client.stream("GET", "/api/events", **options) as answer:  # type: ignore[arg-type]
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        yield iter(httpx2.EventSource(answer))


def _read_until(events: Iterator[httpx2.ServerSentEvent], last_seq: int
                ) -> list[httpx2.ServerSentEvent]:
    seen: list[httpx2.ServerSentEvent] = []
    for event in events:
        seen.append(event)
        if int(event.id) >= last_seq:
            break
    return seen


def test_the_stream_replays_the_log_from_after_then_follows_it(server: Server) -> None:
    """?after=0 streams every stored event in seq order, then new events as they commit."""
    _some_events(server)
    server.wait_quiet()
    last_seq = int(server.sql("SELECT max(seq) FROM events")[0][0])
    with _stream(server, params={"after": 0}) as events:
        seen = _read_until(events, last_seq)
        ids = [int(e.id) for e in seen]
        assert ids == list(range(1, last_seq + 1))
        for event in seen[-3:]:
            data = json.loads(event.data)
            assert data["seq"] == int(event.id)
            assert data["type"] == event.event
            assert len(data["hash"]) == 64
        name = place(server, "parked", unique("live"))
        with server.client() as client:
            made = client.post("/api/jobs", json={"workflow_name": "parked", "file_path": name})
        live = next(events)
    assert int(live.id) == last_seq + 1
    assert live.event == "job.created"
    assert json.loads(live.data)["job_id"] == made.json()["id"]
    with server.client() as client:
        client.post(f"/api/jobs/{made.json()['id']}/cancel")


def test_last_event_id_resumes_after_that_event(server: Server) -> None:
    """Last-Event-ID: N (or ?after=N) gives only the events after N."""
    _some_events(server)
    last_seq = int(server.sql("SELECT max(seq) FROM events")[0][0])
    resume_at = last_seq - 2
    with _stream(server, headers={"Last-Event-ID": str(resume_at)}) as events:
        resumed = _read_until(events, last_seq)
    assert [int(e.id) for e in resumed] == list(range(resume_at + 1, last_seq + 1))
    with _stream(server, params={"after": str(last_seq - 1)}) as events:
        assert int(next(events).id) == last_seq


def _fill_the_log(server: Server, megabytes: int) -> None:
    """Events of 512 KiB each (a parked job's note), so one stream outgrows the socket buffers."""
    with server.client() as client:
        for i in range(megabytes * 2):
            name = place(server, "parked", f"big-{i}")
            made = client.post("/api/parked/process",
                               json={"file_path": name, "note": "n" * (512 * 1024)})
            assert made.status_code == 201, made.text


def _silent_client(server: Server) -> socket.socket:
    """A stream request from a client that never reads (with a tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /api/events?after=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {server.token}\r\n\r\n".encode())
    return sock


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Read what is buffered; True if the server had closed the connection (EOF)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_client_that_does_not_read_is_disconnected(
        start_server: Callable[..., Server]) -> None:
    """A stalled SSE client is cut after the send timeout; the server answers others meanwhile
    and its memory does not grow with the backlog."""
    server = start_server(watchers="false")
    _fill_the_log(server, megabytes=6)
    rss_before_kib = server.rss_kib()
    sock = _silent_client(server)
    try:
        deadline = time.monotonic() + SEND_TIMEOUT_S + 3
        with server.client() as client:
            while time.monotonic() < deadline:
                started = time.monotonic()
                assert client.get("/api/queue").status_code == 200
                assert client.get("/livez").status_code == 200
                assert time.monotonic() - started < 1.0
                time.sleep(0.5)
        rss_growth_kib = server.rss_kib() - rss_before_kib
        assert _closed_by_server(sock, timeout_s=5.0), "the stalled stream was not cut"
    finally:
        sock.close()
    assert rss_growth_kib < 64 * 1024, rss_growth_kib
    with server.client() as client:
        assert client.get("/api/queue").status_code == 200
