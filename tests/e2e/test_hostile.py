"""Hostile input that really reaches the server: none of it may write an event or answer 5xx."""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e.serverkit import Server, launch, place, raw_request, unique

TRAVERSALS = [
    "../x", "../../../../etc/passwd", "..%2f..%2fetc%2fpasswd", "..", ".", "//etc/passwd",
    "/etc/passwd", "/", "a\x00b", "\x00", "sub/../../x", "a//b", "\\..\\..\\etc\\passwd",
    "~/.ssh/id_rsa", "%2e%2e/x", "input/../../../x", "x/" * 2000 + "y",
]


@contextlib.contextmanager
def no_new_events(server: Server) -> Iterator[None]:
    """Assert that the block leaves the event log as long as it was."""
    before = server.wait_quiet()
    yield
    time.sleep(0.05)
    assert server.event_count() == before, "hostile input wrote an event"


def assert_refused(answer: httpx2.Response | tuple[int, dict[str, str], bytes],
                   *statuses: int) -> None:
    status = answer.status_code if isinstance(answer, httpx2.Response) else answer[0]
    text = answer.text if isinstance(answer, httpx2.Response) else answer[2][:300]
    assert status < 500, f"{status}: {text!r}"
    if statuses:
        assert status in statuses, f"{status}: {text!r}"


def _jobs_body(file_path: Any) -> dict[str, Any]:
    return {"workflow_name": "echo", "file_path": file_path}


@pytest.mark.parametrize("file_path", TRAVERSALS, ids=range(len(TRAVERSALS)))
def test_traversal_in_file_path_is_refused(server: Server, file_path: str) -> None:
    """`file_path` that leaves input/ (or names nothing) is a 4xx for both create routes."""
    with no_new_events(server), server.client() as client:
        assert_refused(client.post("/api/jobs", json=_jobs_body(file_path)), 404, 422)
        assert_refused(client.post("/api/echo/process", json={"file_path": file_path}), 404, 422)


def test_symlinks_out_of_input_are_refused(server: Server) -> None:
    """A symlink in input/ to a file or folder outside it is refused with 422."""
    inbox = server.input_dir("echo")
    link, folder = unique("evil"), unique("etc")
    os.symlink("/etc/passwd", inbox / link)
    os.symlink("/etc", inbox / folder)
    with no_new_events(server), server.client() as client:
        for file_path in (link, f"{folder}/passwd", f"{folder}/hostname"):
            for path, body in (("/api/jobs", _jobs_body(file_path)),
                               ("/api/echo/process", {"file_path": file_path})):
                refused = client.post(path, json=body)
                assert_refused(refused, 422)
                assert refused.json()["field"] == "file_path"


@pytest.mark.parametrize("kind", ["symlink-loop", "long-name"])
def test_unusual_names_in_input_are_a_4xx_not_a_500(server: Server, kind: str) -> None:
    """A symlink loop, or a name past NAME_MAX, is refused, not an internal error."""
    if kind == "symlink-loop":
        name = unique("loop")
        os.symlink(name, server.input_dir("echo") / name)
    else:
        name = "n" * 300
    with no_new_events(server), server.client() as client:
        assert_refused(client.post("/api/jobs", json=_jobs_body(name)), 404, 422)


@pytest.mark.parametrize("filename", ["../x", "..", ".", "/etc/passwd", "a/b", "a\\b",
                                      "a\x00b", ".hidden", "", "n" * 300])
def test_upload_names_are_one_plain_segment(server: Server, filename: str) -> None:
    """An upload's filename must be one plain name: 422, and no file left anywhere."""
    inbox_before = set(os.listdir(server.input_dir("echo")))
    with no_new_events(server), server.client() as client:
        refused = client.post("/api/echo/process", params={"filename": filename},
                              content=b"payload",
                              headers={"Content-Type": "application/octet-stream"})
    assert_refused(refused, 422)
    assert set(os.listdir(server.input_dir("echo"))) == inbox_before
    assert not server.staged_files()


@pytest.mark.parametrize(("params", "headers"), [
    ({"channel_name": "a\x00b"}, {}),
    ({"channel_name": "line\nbreak"}, {}),
    ({"channel_name": "trailing\n"}, {}),
    ({}, {"Idempotency-Key": "tab\there"}),
    ({}, {"Idempotency-Key": "k" * 256}),
])
def test_upload_options_with_control_characters_are_refused_before_the_file_lands(
        server: Server, params: dict[str, str], headers: dict[str, str]) -> None:
    """A channel name or an Idempotency-Key that the job's row cannot keep as given: 422
    before a byte of the upload lands, so no file is left for the watcher to make a job of."""
    inbox_before = set(os.listdir(server.input_dir("echo")))
    with no_new_events(server), server.client() as client:
        refused = client.post("/api/echo/process",
                              params={"filename": unique("up") + ".txt", **params},
                              content=b"payload",
                              headers={"Content-Type": "application/octet-stream", **headers})
    assert_refused(refused, 422)
    assert set(os.listdir(server.input_dir("echo"))) == inbox_before
    assert not server.staged_files()


RAW_TARGETS = [
    ("GET", "/api/jobs/..%2f..%2fetc%2fpasswd"),
    ("GET", "/api/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/events"),
    ("GET", "/api/..%2f..%2fetc/status/x"),
    ("POST", "/api/..%2fecho/process"),
    ("POST", "/api/%2e%2e/process"),
    ("GET", "/api/echo/status/..%2f..%2f..%2fmultiflow.db"),
    ("GET", "/api/jobs/%00"),
    ("POST", "/api/jobs/%00/cancel"),
    ("GET", "/api/../../etc/passwd"),
    ("GET", "//etc/passwd"),
    ("GET", "/api/jobs?cursor=%00"),
]


@pytest.mark.parametrize(("method", "target"), RAW_TARGETS)
def test_raw_paths_reach_the_router_and_are_refused(server: Server, method: str,
                                                    target: str) -> None:
    """Paths sent byte for byte (no client normalisation) are 4xx and write nothing."""
    with no_new_events(server):
        assert_refused(raw_request(server, method, target, token=server.token,
                                   headers={"Content-Type": "application/json"},
                                   body=b'{"file_path": "x"}' if method == "POST" else b""))


def test_ten_megabytes_of_json_is_413(server: Server) -> None:
    """A JSON body past body_max_bytes (1 MiB) is refused with 413."""
    body = b'{"workflow_name": "echo", "file_path": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    with no_new_events(server), server.client() as client:
        refused = client.post("/api/jobs", content=body,
                              headers={"Content-Type": "application/json"})
        assert_refused(refused, 413)

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * (1024 * 1024)

        streamed = client.post("/api/jobs", content=chunks(),
                               headers={"Content-Type": "application/json"})
        assert_refused(streamed, 413)


@pytest.mark.parametrize(("path", "content", "content_type", "status"), [
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x"}', "text/plain", 415),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x"}', "", 415),
    ("/api/jobs", b"workflow_name=echo", "application/x-www-form-urlencoded", 415),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": ', "application/json", 400),
    ("/api/jobs", b"\xff\xfe", "application/json", 400),
    ("/api/jobs", b"[]", "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x", "admin": true}',
     "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "nope", "file_path": "x"}', "application/json", 404),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x", "priority": 101}',
     "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x", "priority": -101}',
     "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x", "priority": "high"}',
     "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "echo"}', "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x", "channel_name": "a\\u0000b"}',
     "application/json", 422),
    ("/api/echo/process", b'{"file_path": "x", "channel_name": "tab\\there"}',
     "application/json", 422),
    ("/api/jobs", b'{"workflow_name": "echo", "file_path": "x", "channel_name": "end\\n"}',
     "application/json", 422),
    ("/api/echo/process", b'{"file_path": "x"', "application/json", 400),
    ("/api/echo/process", b'{"file_path": "x"}', "text/csv", 415),
    ("/api/echo/process", b"[1, 2]", "application/json", 422),
    ("/api/echo/process", b'{"file_path": 7}', "application/json", 422),
    ("/api/echo/process", b'{"file_path": "x", "priority": 1000}', "application/json", 422),
    ("/api/nope/process", b'{"file_path": "x"}', "application/json", 404),
    ("/api/jobs/nope/cancel", b'{"reason": 5}', "application/json", 422),
    ("/api/jobs/nope/cancel", b'{"reason": "x", "force": true}', "application/json", 422),
])
def test_bad_bodies_are_refused_with_the_right_status(
        server: Server, path: str, content: bytes, content_type: str, status: int) -> None:
    """Wrong content type 415, invalid JSON 400, unknown fields / bad values 422, 404."""
    place(server, "echo", "x")
    headers = {"Content-Type": content_type} if content_type else {}
    with no_new_events(server), server.client() as client:
        refused = client.post(path, content=content, headers=headers)
    assert_refused(refused, status)
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["status"] == status


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "1001"}, {"limit": "abc"}, {"limit": "-1"},
    {"cursor": "not-a-cursor"}, {"cursor": _cursor(b'["1"]')}, {"cursor": _cursor(b"{}")},
    {"status": "exploded"}, {"created_after": "yesterday"}, {"colour": "red"},
])
def test_bad_list_queries_are_422(server: Server, params: dict[str, str]) -> None:
    """A bad limit, cursor, status, date or an unknown parameter is a 422."""
    with no_new_events(server), server.client() as client:
        assert_refused(client.get("/api/jobs", params=params), 422)


@pytest.mark.parametrize("key", ["created_after", "created_before"])
def test_a_date_without_a_timezone_is_not_a_500(server: Server, key: str) -> None:
    """created_after/created_before without an offset is refused (or read as UTC), never 500."""
    with no_new_events(server), server.client() as client:
        answer = client.get("/api/jobs", params={key: "2020-01-01T00:00:00"})
    assert_refused(answer)


def test_a_forged_cursor_past_int64_is_422(server: Server) -> None:
    """A cursor we did not make is a 422, whatever number it holds."""
    with no_new_events(server), server.client() as client:
        forged = _cursor(b"[18446744073709551615]")
        assert_refused(client.get("/api/jobs", params={"cursor": forged}), 422)


@pytest.mark.parametrize("after", ["\u00b2", "99999999999999999999999"])
def test_a_bad_sse_position_is_422(server: Server, after: str) -> None:
    """/api/events?after= must be a seq number within range, else 422."""
    with no_new_events(server), server.client() as client, \
            client.stream("GET", "/api/events", params={"after": after}) as answer:
        if answer.status_code != 200:  # a 200 is an endless stream: do not read it
            answer.read()
        assert answer.status_code == 422, answer.status_code


def test_bad_sse_position_text_is_422(server: Server) -> None:
    """A non-numeric `after` or Last-Event-ID is a 422."""
    with no_new_events(server), server.client() as client:
        assert_refused(client.get("/api/events", params={"after": "-1"}), 422)
        assert_refused(client.get("/api/events", headers={"Last-Event-ID": "abc"}), 422)


def _operations(server: Server) -> list[tuple[str, str]]:
    with server.anonymous() as client:
        spec = client.get("/openapi.json").json()
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if operation.get("security", spec.get("security")):
                concrete = path.replace("{workflow_name}", "echo").replace("{job_id}", "x") \
                    .replace("{task_id}", "x")
                found.append((method.upper(), concrete))
    return found


@pytest.mark.parametrize("authorization", [
    None, "Bearer wrong", "Bearer", "Basic Y2k6c2VjcmV0", "bearer", "Token {token}",
    "Bearer {token}x", "Bearer {prefix}",
])
def test_every_protected_route_needs_a_valid_token(server: Server,
                                                   authorization: str | None) -> None:
    """Each route that /openapi.json protects answers 401 without a (valid) bearer token."""
    operations = _operations(server)
    assert len(operations) >= 11
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization.format(token=server.token,
                                                        prefix=server.token[:-1])
    with no_new_events(server), server.anonymous(headers=headers) as client:
        for method, path in operations:
            answer = client.request(method, path, content=b"{}" if method == "POST" else None)
            assert answer.status_code == 401, (method, path, answer.status_code)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.headers["content-type"] == "application/problem+json"


def test_errors_keep_the_connection_alive(server: Server) -> None:
    """A 4xx answer leaves the keep-alive connection usable and logs no traceback."""
    log_before = len(server.log_text())
    with server.client(keepalive=True) as client:
        refused = client.post("/api/jobs", json=_jobs_body("../x"))
        assert refused.status_code == 422
        time.sleep(0.2)  # let the server's close (if any) arrive first
        after = client.get("/api/queue")
    assert after.status_code == 200
    assert "Exception in ASGI application" not in server.log_text()[log_before:]


def test_a_workflow_log_removed_under_the_server_is_reopened(tmp_path: Path) -> None:
    """`rm data/logs/echo.log` (or logrotate without copytruncate): the jobs after it
    complete, their lines land in a new echo.log, and the server stops on SIGTERM (its
    next rotation raised, the node's observer died, jobs stayed running, and SIGTERM
    did not end it)."""
    server = launch(tmp_path / "srv", watchers="false", log_file_max_bytes="2000")
    try:
        with server.client() as client:
            made = client.post("/api/echo/process", json={"file_path": place(server, "echo", "a")})
            assert made.status_code == 201, made.text
            server.wait_job(made.json()["id"])
            log_file = server.data_dir / "logs" / "echo.log"
            deadline = time.monotonic() + 10
            while not log_file.exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            log_file.unlink()
            ids = []
            for i in range(10):
                made = client.post("/api/echo/process",
                                   json={"file_path": place(server, "echo", f"b{i}")})
                assert made.status_code == 201, made.text
                ids.append(made.json()["id"])
        for job_id in ids:
            assert server.wait_job(job_id)["status"] == "completed"
        deadline = time.monotonic() + 10
        while not (log_file.exists() and ids[-1].encode() in log_file.read_bytes()):
            assert time.monotonic() < deadline, "no new echo.log"
            time.sleep(0.1)
    finally:
        assert server.stop() == 0, server.log_text()[-2000:]


def test_a_name_that_is_not_utf8_is_refused_and_its_reason_logged(tmp_path: Path) -> None:
    """With JSON logs, the line saying why `caf\\xe9.txt` was refused is written (escaped),
    and the watcher goes on (the line raised, and the watcher died of it)."""
    server = launch(tmp_path / "srv")
    try:
        inbox = server.input_dir("echo")
        with open(os.path.join(os.fsencode(inbox), b"caf\xe9.txt"), "wb") as handle:
            handle.write(b"hello")
        deadline = time.monotonic() + 15
        while "file_rejected" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.1)
        assert list((server.data_dir / "echo" / "error").iterdir())
        assert "watcher_failed" not in server.log_text()
    finally:
        server.stop()
