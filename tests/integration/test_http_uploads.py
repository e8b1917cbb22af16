"""Uploads and odd requests through the API (POST /api/{workflow}/process and others):
what a client that races, retries, re-uploads, hangs up or mounts the app must get.

Each case was found by a review of the HTTP layer; each answer must change nothing it
should not (no file without a job, no job with someone else's bytes, no 500)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx2
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import adapters.http.ops
from adapters import Kernel
from adapters.config import Settings
from adapters.fsutil import TEMP_SUFFIX
from adapters.http.app import create_app
from adapters.http.state import AppState
from adapters.notify.records import DeadLetter
from kernel.config import WorkflowConfig
from kernel.task import BaseProcessor, BaseTask, JobContext
from tests.integration.test_watch import Gate

pytestmark = pytest.mark.anyio
TOKEN = "uploads-token-0123456789abcdef"
OCTET = {"Content-Type": "application/octet-stream"}
KEYED = {**OCTET, "Idempotency-Key": "key-1"}


class EchoTask(BaseTask):
    word: Annotated[str, msgspec.Meta(max_length=100)] = "hi"
    times: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1


class Parked(BaseProcessor):
    Task = EchoTask

    def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        return {}


@contextlib.asynccontextmanager
async def kernel_app(data: Path, **settings: Any) -> AsyncIterator[tuple[Kernel, Any]]:
    """A kernel on SQLite whose workflow `wf` queues jobs without running them, and the
    API over it (no rate limit unless asked)."""
    async with Kernel.open(data_dir=data, drain_grace_s=0) as kernel:
        kernel.register_workflow("wf", Parked(), config=WorkflowConfig(enabled=False))
        await kernel.ready()
        chosen = Settings(api_tokens=[f"test:{TOKEN}"],
                          **{"rate_limit_burst": 100_000, **settings})
        yield kernel, create_app(AppState(kernel=kernel, settings=chosen,
                                          tokens=[f"test:{TOKEN}"]))


def client(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test", headers={"Authorization": f"Bearer {TOKEN}"})


async def test_concurrent_uploads_of_one_name_never_overwrite(tmp_path: Path) -> None:
    """Eight uploads of one name at once: one 201, seven 409s, and input/ holds the bytes
    of the upload that got the 201 (a check for the name, then a rename, let a second
    rename replace the first's file: its job then processed someone else's bytes)."""
    data = tmp_path / "data"

    async def upload(http: httpx2.AsyncClient, name: str, i: int, answers: dict[int, int]
                     ) -> None:
        r = await http.post("/api/wf/process", params={"filename": name, "times": "1"},
                            content=f"uploader {i}".encode(), headers=OCTET)
        answers[i] = r.status_code

    async with kernel_app(data) as (_, app), client(app) as http:
        for round_ in range(30):
            name = f"same-{round_}.txt"
            answers: dict[int, int] = {}
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(upload, http, name, i, answers)
            codes = sorted(answers.values())
            winner = next(i for i, code in answers.items() if code == 201)
            held = (data / "wf" / "input" / name).read_bytes()
            assert held == f"uploader {winner}".encode(), \
                f"round {round_}: the 201 was uploader {winner}, input/ holds {held!r}; {codes}"
            assert set(codes) <= {201, 409}, (round_, codes)


class Held(Gate):
    """Runs until released; reports the bytes it was given."""

    async def process(self, ctx: JobContext, task: Any) -> dict[str, Any]:
        await super().process(ctx, task)
        return {"bytes": ctx.input_path.read_bytes().decode()}


async def test_a_new_upload_under_a_running_jobs_name_is_not_answered_with_that_job(
        tmp_path: Path) -> None:
    """v1 of report.csv is running (its file is in processing/). Uploading v2 under the
    same name is refused with 409 and leaves nothing in input/ (it was answered 200 with
    v1's job, and v2's bytes stayed in input/ with no job)."""
    data = tmp_path / "data"
    held = Held()
    async with Kernel.open(data_dir=data, drain_grace_s=0) as kernel:
        kernel.register_workflow("wf", held, config=WorkflowConfig(max_attempts=1))
        await kernel.ready()
        settings = Settings(api_tokens=[f"t:{TOKEN}"])
        app = create_app(AppState(kernel=kernel, settings=settings, tokens=[f"t:{TOKEN}"]))
        async with client(app) as http:
            v1 = await http.post("/api/wf/process", params={"filename": "report.csv"},
                                 content=b"version 1", headers=OCTET)
            assert v1.status_code == 201
            with anyio.fail_after(5):
                await held.started.wait()
            v2 = await http.post("/api/wf/process", params={"filename": "report.csv"},
                                 content=b"version 2", headers=OCTET)
            held.release.set()
            await kernel.wait(v1.json()["id"], 5)
            leftover = os.listdir(data / "wf" / "input")
        assert v2.status_code == 409, v2.text
        assert "still has an active job" in v2.json()["detail"]
        assert leftover == [], leftover
        assert (await kernel.store.last_seq()) == 3  # v1's created, started, completed


async def test_a_concurrent_retry_with_the_same_key_leaves_no_jobless_file(tmp_path: Path) -> None:
    """The first upload is still streaming when its retry (same key, another name) lands
    and makes the job. The first then answers 200 with that job and takes its own file
    back out of input/ (left there, the watcher would make a second job of it)."""
    data = tmp_path / "data"
    async with kernel_app(data) as (kernel, app), client(app) as http:
        release = anyio.Event()
        answers: dict[str, int] = {}

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"part one "
            await release.wait()
            yield b"part two"

        async def first() -> None:
            r = await http.post("/api/wf/process", params={"filename": "a.txt"},
                                content=slow_body(), headers=KEYED)
            answers["first"] = r.status_code

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.sleep(0.2)  # the first has looked the key up and is streaming
            retry = await http.post("/api/wf/process", params={"filename": "b.txt"},
                                    content=b"part one part two", headers=KEYED)
            assert retry.status_code == 201
            release.set()

        jobs = (await http.get("/api/jobs")).json()["items"]
        owned = {job["file_path"] for job in jobs}
        inbox = {f"wf/input/{name}" for name in os.listdir(data / "wf" / "input")}
        assert len(jobs) == 1
        assert inbox <= owned, f"files in input/ without a job: {inbox - owned} ({answers})"
        assert answers == {"first": 200}

        # What the watcher does with that file a moment later: a second job for one upload.
        made = await kernel._watch_submit("wf")("a.txt", "complete", None)
        assert made is None or made == jobs[0]["id"], "the watcher made a second job"


async def test_a_name_like_a_temporary_file_is_refused_and_an_operators_is_kept(
        tmp_path: Path) -> None:
    """An upload named like multiflow's temporary files is refused before a byte lands
    (accepted, the start-up sweep deleted it from input/ and its job could never run);
    a file of an operator's that merely ends like one survives the sweep."""
    data = tmp_path / "data"
    name = f"report{TEMP_SUFFIX}"
    async with kernel_app(data) as (kernel, app), client(app) as http:
        made = await http.post("/api/wf/process", params={"filename": name},
                               content=b"precious bytes", headers=OCTET)
        assert made.status_code in (400, 422), made.text
        assert await kernel.store.last_seq() == 0
        (data / "wf" / "input" / name).write_bytes(b"an operator's file")
    async with kernel_app(data):  # the next start sweeps only multiflow's own names
        assert (data / "wf" / "input" / name).read_bytes() == b"an operator's file"


async def test_a_disconnect_mid_upload_is_not_an_internal_error(tmp_path: Path) -> None:
    """A client that hangs up mid-upload (a curl ^C) leaves no staging file and is not
    answered or logged as a server error (it was a 500 with a traceback)."""
    async with kernel_app(tmp_path / "data") as (_, app):
        messages = [{"type": "http.request", "body": b"x" * 1000, "more_body": True},
                    {"type": "http.disconnect"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/api/wf/process",
                 "raw_path": b"/api/wf/process", "root_path": "",
                 "query_string": b"filename=gone.bin", "client": ("127.0.0.1", 5000),
                 "server": ("127.0.0.1", 8000),
                 "headers": [(b"authorization", f"Bearer {TOKEN}".encode()),
                             (b"content-type", b"application/octet-stream"),
                             (b"content-length", b"100000")]}
        raised: BaseException | None = None
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            raised = exc
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert raised is None and 500 not in statuses, (repr(raised), statuses)
        assert not list((tmp_path / "data" / ".staging").iterdir())


@pytest.mark.parametrize("raw", ["%C2%B2", "9" * 5000])
async def test_a_non_decimal_letter_id_is_404_not_500(tmp_path: Path, raw: str) -> None:
    """Ids that are not plain decimal numbers ("²" passes `str.isdigit`; 5,000 digits
    are past `int`'s limit) get 404, not a 500."""
    async with kernel_app(tmp_path / "data") as (kernel, app), client(app) as http:
        await kernel.store.add_dead_letter(DeadLetter(  # type: ignore[attr-defined]
            target="hook", seq=1, job_id="j", event_type="job.completed", attempts=5,
            last_error="refused", created_at=datetime.now(UTC)))
        answer = await http.post(f"/api/notifications/dead/{raw}/redeliver")
    assert answer.status_code == 404, (answer.status_code, answer.text[:200])
    assert answer.headers["content-type"] == "application/problem+json"


async def test_the_rate_limit_still_applies_when_the_api_is_mounted(tmp_path: Path) -> None:
    """A token bucket per client on every /api/ route, also when the app is mounted under
    a prefix in another app (as docs/api.md shows): a burst of 1 gives 429 next."""
    async with kernel_app(tmp_path / "data", rate_limit_per_s=0.001, rate_limit_burst=1) \
            as (_, api):
        outer = Starlette(routes=[Mount("/multiflow", app=api)])
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=outer),
                                      base_url="http://test",
                                      headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            codes = [(await http.get("/multiflow/api/queue")).status_code for _ in range(5)]
            # unmounted, the same app answers [200, 429, 429, ...]
    assert codes[0] == 200
    assert 429 in codes, codes


async def test_public_routes_answer_without_a_token_when_mounted(tmp_path: Path) -> None:
    """/livez, /readyz, /openapi.json answer without a token, also under a prefix."""
    async with kernel_app(tmp_path / "data") as (_, api):
        outer = Starlette(routes=[Mount("/multiflow", app=api)])
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=outer),
                                      base_url="http://test") as http:
            codes = {p: (await http.get(f"/multiflow{p}")).status_code
                     for p in ("/livez", "/readyz", "/openapi.json")}
    assert codes == {"/livez": 200, "/readyz": 200, "/openapi.json": 200}, codes


class RefusesWrites:
    """The SQLite writer's connection on a disk that refuses writes (an I/O error, a file
    system remounted read-only): reads work, every write fails."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _check(self, sql: str) -> None:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "BEGIN", "REPLACE")):
            raise sqlite3.OperationalError("disk I/O error")

    def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._real.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._real.executemany(sql, *args)


async def test_readyz_is_503_while_the_store_refuses_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz proves the store writable with a write: a store whose disk refuses every
    write is "not ready" (it answered from memory, and a load balancer kept sending work
    to a node that could take none), and ready again once writes work. Within a second
    the last probe's answer is given again, with no write."""
    async with kernel_app(tmp_path / "data", disk_free_min_bytes=0) as (kernel, app), \
            client(app) as http:
        assert (await http.get("/readyz")).status_code == 200
        store: Any = kernel.store
        real, store._writer = store._writer, RefusesWrites(store._writer)
        try:
            assert (await http.get("/readyz")).status_code == 200  # the last probe's answer
            monkeypatch.setattr(adapters.http.ops, "PROBE_EVERY_S", 0.0)
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert any(c["name"] == "store" and not c["ok"] for c in ready.json()["checks"])
        finally:
            store._writer = real
        assert (await http.get("/readyz")).status_code == 200


async def test_readyz_is_503_until_the_watchers_are_started(tmp_path: Path) -> None:
    """`multiflow run` answers HTTP before its watchers start: until they do, /readyz is
    503 "starting" (it was 200, and a file dropped at once could wait for the rescan)."""
    async with kernel_app(tmp_path / "data", disk_free_min_bytes=0) as (kernel, _):
        settings = Settings(api_tokens=[f"test:{TOKEN}"], disk_free_min_bytes=0)
        state = AppState(kernel=kernel, settings=settings, tokens=[f"test:{TOKEN}"],
                         starting=True)
        async with client(create_app(state)) as http:
            starting = await http.get("/readyz")
            assert starting.status_code == 503 and "starting" in starting.text
            state.starting = False
            assert (await http.get("/readyz")).status_code == 200
