"""Rate limits and the upload size limit, on the real server."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from tests.e2e.serverkit import Server, launch, unique

UPLOAD_MAX_BYTES = 64 * 1024  # the session server's MULTIFLOW_UPLOAD_MAX_BYTES


def test_a_burst_past_the_rate_limit_gets_429_with_retry_after(
        start_server: Callable[..., Server]) -> None:
    """With 1 request/s and a burst of 3, a quick burst of 8 gets 429s with Retry-After."""
    server = start_server(rate_limit_per_s="1", rate_limit_burst="3", watchers="false")
    before = server.event_count()
    with server.client() as client:
        answers = [client.get("/api/queue") for _ in range(8)]
        public = client.get("/livez")
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200, 200, 200], codes
    limited = [a for a in answers if a.status_code == 429]
    assert len(limited) >= 4, codes
    for answer in limited:
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.headers["content-type"] == "application/problem+json"
    assert public.status_code == 200  # health checks are not rate limited
    assert server.event_count() == before


def test_guessing_tokens_is_rate_limited(start_server: Callable[..., Server]) -> None:
    """A burst of requests with wrong tokens from one address also meets 429."""
    server = start_server(rate_limit_per_s="1", rate_limit_burst="3", watchers="false")
    with server.anonymous(headers={"Authorization": "Bearer guess"}) as client:
        codes = [client.get("/api/queue").status_code for _ in range(20)]
    assert 429 in codes, codes


def _upload(server: Server, client: httpx2.Client, name: str,
            content: bytes | Iterator[bytes]) -> httpx2.Response:
    return client.post("/api/echo/process", params={"filename": name}, content=content,
                       headers={"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize("how", ["content-length", "chunked"])
def test_an_upload_over_the_limit_is_413_and_leaves_no_file(server: Server, how: str) -> None:
    """Past upload_max_bytes: 413, no event, nothing in input/ or data/.staging."""
    name = unique("big")
    size = UPLOAD_MAX_BYTES * 4

    def chunks() -> Iterator[bytes]:
        for _ in range(size // 8192):
            yield b"z" * 8192

    before = server.wait_quiet()
    with server.client() as client:
        body = b"z" * size if how == "content-length" else chunks()
        refused = _upload(server, client, name, body)
    assert refused.status_code == 413, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert server.event_count() == before
    assert not (server.input_dir("echo") / name).exists()
    assert server.staged_files() == []


def test_an_upload_at_the_limit_is_taken(server: Server) -> None:
    """Exactly upload_max_bytes is accepted and processed."""
    with server.client() as client:
        made = _upload(server, client, unique("edge"), b"e" * UPLOAD_MAX_BYTES)
    assert made.status_code == 201, made.text
    job = server.wait_job(made.json()["id"])
    assert job["result"]["size"] == UPLOAD_MAX_BYTES
    assert server.staged_files() == []


def test_an_upload_cut_short_by_a_kill_is_swept_at_the_next_start(tmp_path: Path) -> None:
    """A server killed mid-upload (OOM, a power cut) leaves the upload's staging file;
    the next start on the same data root removes it before the API answers (up to
    upload_max_bytes each, they were left for ever)."""
    settings = {"watchers": "false", "upload_max_bytes": str(1024 * 1024)}
    server = launch(tmp_path / "s", **settings)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                f"POST /api/echo/process?filename=big.bin HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {server.token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: 900000\r\n\r\n"
                .encode() + b"a" * 300_000)
            deadline = time.monotonic() + 5
            while not server.staged_files() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.staged_files(), "the upload never reached staging"
            server.stop(signal.SIGKILL)
    finally:
        server.stop(signal.SIGKILL)
    again = launch(tmp_path / "s", **settings)  # the same data root
    try:
        assert again.staged_files() == []
    finally:
        again.stop()
