"""Happy paths of the HTTP API against the real server: jobs, process, status, queue, docs."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx2
import pytest
from openapi_spec_validator import validate

from tests.e2e.serverkit import Server, place, unique

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def create(client: httpx2.Client, workflow_name: str, name: str, **extra: Any) -> httpx2.Response:
    return client.post("/api/jobs", json={"workflow_name": workflow_name, "file_path": name,
                                          **extra})


def test_create_job_answers_201_with_location_then_200_with_the_same_job(server: Server) -> None:
    """A second submit of a file whose job is still active returns that job with 200."""
    name = place(server, "parked", unique("same") + ".txt")
    with server.client() as client:
        first = create(client, "parked", name, priority=7, channel_name="api-test")
        assert first.status_code == 201, first.text
        job = first.json()
        assert first.headers["location"] == f"/api/jobs/{job['id']}"
        assert job["file_path"] == f"parked/input/{name}"
        assert (job["status"], job["priority"], job["channel_name"]) == ("pending", 7, "api-test")
        fetched = client.get(first.headers["location"])
        assert fetched.status_code == 200 and fetched.json()["id"] == job["id"]
        again = create(client, "parked", name)
        assert again.status_code == 200, again.text
        assert again.json()["id"] == job["id"]
        assert again.headers["location"] == first.headers["location"]
        assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200


def test_a_dot_segment_does_not_make_a_second_active_job_for_one_file(server: Server) -> None:
    """`./name` names the same file as `name`: the submit returns the existing active job."""
    name = place(server, "parked", unique("alias") + ".txt")
    with server.client() as client:
        first = create(client, "parked", name)
        assert first.status_code == 201
        second = create(client, "parked", f"./{name}")
        ids = {response.json()["id"] for response in (first, second)
               if response.status_code in (200, 201)}
        for job_id in ids:
            client.post(f"/api/jobs/{job_id}/cancel")
        assert second.status_code in (200, 422), second.text
        assert len(ids) == 1 or second.status_code == 422


def test_a_completed_job_shows_its_result_and_its_chained_events(server: Server) -> None:
    """GET /api/jobs/{id} shows the result; /events lists seq, version and a sha256 hash."""
    name = place(server, "echo", unique("done") + ".txt", b"12345")
    with server.client() as client:
        job_id = create(client, "echo", name).json()["id"]
        job = server.wait_job(job_id)
        assert job["status"] == "completed", job
        assert job["attempts"] == 1
        assert job["result"] == {"echo": "hi", "size": 5}
        assert job["current_path"].startswith("echo/archive/")
        assert job["finished_at"] is not None
        events = client.get(f"/api/jobs/{job_id}/events")
    assert events.status_code == 200
    history = events.json()
    types = [e["type"] for e in history]
    assert types[0] == "job.created" and types[-1] == "job.completed"
    assert "job.started" in types
    assert [e["version"] for e in history] == list(range(1, len(history) + 1))
    seqs = [e["seq"] for e in history]
    assert seqs == sorted(set(seqs))
    assert all(HEX64.match(e["hash"]) for e in history)
    assert len({e["hash"] for e in history}) == len(history)
    assert all(e["job_id"] == job_id for e in history)
    assert history[0]["data"]["workflow_name"] == "echo"


def test_list_jobs_filters_and_pages_with_a_cursor(server: Server) -> None:
    """Filters narrow the list; limit and next_cursor page through it, newest first."""
    channel = unique("page")
    with server.client() as client:
        created = [create(client, "parked", place(server, "parked", f"{channel}-{i}.txt"),
                          channel_name=channel).json()["id"] for i in range(5)]
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"workflow_name": "parked", "channel_name": channel,
                                      "status": "pending", "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/jobs", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["items"]) <= 2
            seen += [item["id"] for item in body["items"]]
            cursor, pages = body["next_cursor"], pages + 1
            if cursor is None:
                break
        assert seen == list(reversed(created))
        assert pages == 3
        done = client.get("/api/jobs", params={"channel_name": channel, "status": "completed"})
        assert done.json() == {"items": [], "next_cursor": None}
        other = client.get("/api/jobs", params={"channel_name": channel,
                                                "workflow_name": "echo"})
        assert other.json()["items"] == []
        for job_id in created:
            client.post(f"/api/jobs/{job_id}/cancel")


def test_cancel_and_retry_follow_the_lifecycle(server: Server) -> None:
    """Cancel a pending job (with a reason), retry it; a completed job refuses both (409)."""
    with server.client() as client:
        parked = create(client, "parked", place(server, "parked", unique("cancel"))).json()
        cancelled = client.post(f"/api/jobs/{parked['id']}/cancel", json={"reason": "e2e"})
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        history = client.get(f"/api/jobs/{parked['id']}/events").json()
        assert history[-1]["type"] == "job.cancelled"
        assert history[-1]["data"]["actor"] == "ci"
        assert history[-1]["data"]["reason"] == "e2e"
        retried = client.post(f"/api/jobs/{parked['id']}/retry")
        assert retried.status_code == 200 and retried.json()["status"] == "pending"
        client.post(f"/api/jobs/{parked['id']}/cancel")

        done = create(client, "echo", place(server, "echo", unique("finished"))).json()
        server.wait_job(done["id"])
        for action in ("cancel", "retry"):
            refused = client.post(f"/api/jobs/{done['id']}/{action}")
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["status"] == 409


def test_a_failed_job_can_be_retried(server: Server) -> None:
    """A job that failed for good goes back to the queue on retry and runs again."""
    name = place(server, "echo", unique("boom"))
    with server.client() as client:
        made = client.post("/api/echo/process", json={"file_path": name, "word": "boom"})
        assert made.status_code == 201, made.text
        failed = server.wait_job(made.json()["id"])
        assert failed["status"] == "failed"
        assert failed["error"]["type"] == "Boom"
        retried = client.post(f"/api/jobs/{failed['id']}/retry", json={"reason": "again"})
        assert retried.status_code == 200, retried.text
        again = server.wait_job(failed["id"], ("failed",))
        assert again["attempts"] == 2


def test_process_validates_the_tasks_parameters(server: Server) -> None:
    """JSON params are typed by the workflow's BaseTask: good ones reach the processor."""
    name = place(server, "echo", unique("params"), b"abc")
    with server.client() as client:
        made = client.post("/api/echo/process",
                           json={"file_path": name, "word": "yo", "times": 3, "priority": 9})
        assert made.status_code == 201, made.text
        assert made.json()["priority"] == 9
        job = server.wait_job(made.json()["id"])
    assert job["result"] == {"echo": "yoyoyo", "size": 3}


@pytest.mark.parametrize(("params", "field"), [
    ({"times": "three"}, "times"),
    ({"times": 11}, "times"),
    ({"word": "x" * 101}, "word"),
    ({"colour": "red"}, "colour"),
])
def test_process_refuses_bad_parameters_naming_the_field(
        server: Server, params: dict[str, Any], field: str) -> None:
    """A parameter the BaseTask refuses is a 422 whose detail names the field; no event."""
    name = place(server, "echo", unique("badparam"))
    before = server.wait_quiet()
    with server.client() as client:
        refused = client.post("/api/echo/process", json={"file_path": name, **params})
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert field in refused.json()["detail"]
    assert server.event_count() == before


def test_a_bad_task_parameter_is_named_in_the_problems_field_member(server: Server) -> None:
    """Like CreateJob's errors, a BaseTask error puts the field's name in `field`."""
    name = place(server, "echo", unique("field"))
    with server.client() as client:
        refused = client.post("/api/echo/process", json={"file_path": name, "times": "x"})
    assert refused.status_code == 422
    assert refused.json().get("field") == "times"


def upload(client: httpx2.Client, name: str, data: bytes, key: str | None = None,
           **params: Any) -> httpx2.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if key:
        headers["Idempotency-Key"] = key
    return client.post("/api/echo/process", params={"filename": name, **params},
                       content=data, headers=headers)


def test_upload_with_idempotency_key_makes_one_job(server: Server) -> None:
    """An octet-stream upload makes a job (201); the same Idempotency-Key again answers 200."""
    name, key = unique("up") + ".bin", unique("key")
    with server.client() as client:
        first = upload(client, name, b"\x00\x01payload", key, priority=5, word="up")
        assert first.status_code == 201, first.text
        job = first.json()
        assert job["file_path"] == f"echo/input/{name}"
        assert job["priority"] == 5
        assert first.headers["location"] == f"/api/jobs/{job['id']}"
        done = server.wait_job(job["id"])
        assert done["result"] == {"echo": "up", "size": 9}
        again = upload(client, name, b"\x00\x01payload", key, priority=5, word="up")
        assert again.status_code == 200, again.text
        assert again.json()["id"] == job["id"]
    assert not server.staged_files()


def test_upload_accepts_a_typed_parameter_in_the_query(server: Server) -> None:
    """An upload's ?times=3 fills the BaseTask's int field."""
    with server.client() as client:
        made = upload(client, unique("typed"), b"abc", times="3")
        assert made.status_code == 201, made.text
        job = server.wait_job(made.json()["id"])
    assert job["result"]["echo"] == "hihihi"


def test_an_upload_refused_for_its_params_leaves_no_file(server: Server) -> None:
    """A 422 upload changes nothing: no event, no file in input/ or data/.staging."""
    name = unique("refused")
    before = server.wait_quiet()
    with server.client() as client:
        refused = upload(client, name, b"abc", colour="red")
    assert refused.status_code == 422, refused.text
    assert server.event_count() == before
    assert not server.staged_files()
    assert not (server.input_dir("echo") / name).exists()


def test_workflow_status_is_scoped_to_its_workflow(server: Server) -> None:
    """/api/{wf}/status/{id} shows the job and result; another workflow's id is a 404."""
    name = place(server, "echo", unique("status"))
    with server.client() as client:
        job_id = create(client, "echo", name).json()["id"]
        server.wait_job(job_id)
        status = client.get(f"/api/echo/status/{job_id}")
        assert status.status_code == 200, status.text
        assert status.json()["job"]["id"] == job_id
        assert status.json()["result"] == {"echo": "hi", "size": 6}
        for other in (f"/api/slow/status/{job_id}", f"/api/nope/status/{job_id}",
                      "/api/echo/status/no-such-job", f"/api/jobs/{job_id}x"):
            missing = client.get(other)
            assert missing.status_code == 404, other
            assert missing.headers["content-type"] == "application/problem+json"


def test_workflows_lists_each_with_its_parameter_schema(server: Server) -> None:
    """GET /api/workflows names every workflow, its settings and its task's JSON schema."""
    with server.client() as client:
        listed = {w["name"]: w for w in client.get("/api/workflows").json()}
    assert {"echo", "slow", "parked"} <= set(listed)
    assert listed["parked"]["enabled"] is False
    assert listed["echo"]["max_attempts"] == 1
    schema = listed["echo"]["params_schema"]
    text = str(schema)
    assert "word" in text and "times" in text


def test_queue_counts_pending_jobs_by_workflow_and_priority(server: Server) -> None:
    """GET /api/queue reports depth, running and buckets by (workflow, priority)."""
    with server.client() as client:
        job = create(client, "parked", place(server, "parked", unique("queue")),
                     priority=-42).json()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the job enters the queue once intake passed
            queue = client.get("/api/queue").json()
            buckets = [[b["workflow_name"], b["priority"], b["depth"]] for b in queue["buckets"]]
            if ["parked", -42, 1] in buckets:
                break
            time.sleep(0.05)
        client.post(f"/api/jobs/{job['id']}/cancel")
    assert ["parked", -42, 1] in buckets
    assert queue["depth"] >= 1
    assert queue["by_workflow"]["parked"] >= 1
    assert queue["claiming"] is True


def test_health_endpoints_answer_without_a_token(server: Server) -> None:
    """/livez, /readyz and /healthz are public and report the checks."""
    with server.anonymous() as client:
        assert client.get("/livez").json() == {"status": "alive"}
        ready = client.get("/readyz")
        health = client.get("/healthz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    names = {check["name"] for check in health.json()["checks"]}
    assert {"accepting", "store", "disk"} <= names
    assert all(check["ok"] for check in health.json()["checks"])


def test_openapi_json_is_a_valid_openapi_3_1_document(server: Server) -> None:
    """/openapi.json is public JSON, valid OpenAPI 3.1, and documents every API route."""
    with server.anonymous() as client:
        answer = client.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    spec = answer.json()
    assert spec["openapi"].startswith("3.1")
    validate(spec)
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    for path, method in [("/api/jobs", "post"), ("/api/jobs", "get"),
                         ("/api/jobs/{job_id}", "get"), ("/api/jobs/{job_id}/events", "get"),
                         ("/api/jobs/{job_id}/cancel", "post"),
                         ("/api/jobs/{job_id}/retry", "post"),
                         ("/api/{workflow_name}/process", "post"),
                         ("/api/{workflow_name}/status/{task_id}", "get"),
                         ("/api/workflows", "get"), ("/api/queue", "get"),
                         ("/api/events", "get"), ("/livez", "get"), ("/readyz", "get"),
                         ("/healthz", "get")]:
        assert (path, method) in documented


def test_docs_page_loads_nothing_from_outside(server: Server) -> None:
    """/docs is public HTML that names no external URL (it reads /openapi.json itself)."""
    with server.anonymous() as client:
        page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in page.text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text, re.IGNORECASE)
