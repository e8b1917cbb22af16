"""POST /api/jobs in process: the Location of a new job, alone and mounted in another app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from adapters import Kernel
from adapters.config import Settings
from adapters.http.app import create_app
from adapters.http.state import AppState
from kernel.config import WorkflowConfig
from kernel.task import BaseProcessor, JobContext

TOKEN = "test-token-0123456789abcdef"
pytestmark = pytest.mark.anyio


class Parked(BaseProcessor):
    async def process(self, ctx: JobContext, task: object) -> dict[str, object]:
        return {}


@asynccontextmanager
async def kernel_with_files(data: Path, *names: str) -> AsyncIterator[Kernel]:
    async with Kernel.open(store="memory://", data_dir=data, drain_grace_s=0) as kernel:
        kernel.register_workflow("wf", Parked(), config=WorkflowConfig(enabled=False))
        await kernel.ready()
        for name in names:
            (data / "wf" / "input" / name).write_bytes(b"x")
        yield kernel


def client(app: ASGIApp) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test",
                              headers={"Authorization": f"Bearer {TOKEN}"})


def api(kernel: Kernel) -> Starlette:
    settings = Settings(api_tokens=[f"test:{TOKEN}"])
    return create_app(AppState(kernel=kernel, settings=settings, tokens=[f"test:{TOKEN}"]))


@pytest.mark.parametrize("prefix", ["", "/multiflow"])
async def test_a_new_job_is_201_with_its_location_and_the_same_file_again_is_200(
        tmp_path: Path, prefix: str) -> None:
    """The Location names the job's own URL, under the mount point when the app is mounted."""
    async with kernel_with_files(tmp_path / "data", "a.txt") as kernel:
        inner = api(kernel)
        app = Starlette(routes=[Mount(prefix, app=inner)]) if prefix else inner
        async with client(app) as http:
            body = {"workflow_name": "wf", "file_path": "a.txt"}
            first = await http.post(f"{prefix}/api/jobs", json=body)
            again = await http.post(f"{prefix}/api/jobs", json=body)
            job_id = first.json()["id"]
            assert first.status_code == 201
            assert first.headers["content-type"] == "application/json"
            assert int(first.headers["content-length"]) == len(first.content)
            assert first.headers["location"] == f"{prefix}/api/jobs/{job_id}"
            assert (again.status_code, again.json()["id"]) == (200, job_id)
            assert again.headers["location"] == first.headers["location"]
            read = await http.get(first.headers["location"])
            assert read.status_code == 200 and read.json()["file_path"] == "wf/input/a.txt"
