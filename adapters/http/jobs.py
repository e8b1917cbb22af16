"""Routes under /api/jobs and /api/{workflow}: create, read, list, cancel, retry."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from adapters.http.errors import ApiError
from adapters.http.schemas import (
    CreateJob,
    JobList,
    JobOut,
    Limit,
    Reason,
    WorkflowStatus,
    event_out,
)
from adapters.http.security import read_body
from adapters.http.state import AppState
from kernel.ports import JobQuery
from kernel.state import Status

_json = msgspec.json.Encoder()


class JsonResponse(Response):
    """JSON bytes with their headers built directly (Starlette's general init is per request)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)),
                            (b"content-type", b"application/json")]
        if headers:
            self.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                 for k, v in headers.items()]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded by msgspec."""
    return JsonResponse(_json.encode(body), status, headers)


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.multiflow
    return state


def actor(request: Request) -> str:
    return str(request.scope.get("state", {}).get("actor", "anonymous"))


async def decode_json(request: Request, kind: type[Any]) -> Any:
    """The JSON body decoded into `kind`; 415 for another content type, 413 past the limit."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send the body as application/json")
    body = await read_body(request, app_state(request).settings.body_max_bytes)
    return msgspec.json.decode(body, type=kind)


async def create_job(request: Request) -> Response:
    """POST /api/jobs: a file in the workflow's input/ becomes a job (201; 200 if it had one)."""
    payload: CreateJob = await decode_json(request, CreateJob)
    submitted = await app_state(request).kernel.submit_file(
        payload.workflow_name, payload.file_path, priority=payload.priority,
        channel_name=payload.channel_name, completeness="api")
    return created_response(request, submitted.job, submitted.created)


def created_response(request: Request, job: Any, created: bool) -> Response:
    """201 with a Location for a new job, 200 for an existing one."""
    # What url_for("get_job") gives (mounted apps included), without its reverse routing
    # and URL parsing on every submit: a job id is path-safe.
    location = f"{request.scope.get('root_path', '')}/api/jobs/{job.id}"
    return json_response(JobOut.of(job), 201 if created else 200, {"Location": location})


async def get_job(request: Request) -> Response:
    """GET /api/jobs/{job_id}."""
    job = await app_state(request).kernel.get_job(request.path_params["job_id"])
    if job is None:
        raise ApiError(404, f"job {request.path_params['job_id']} does not exist")
    return json_response(JobOut.of(job))


AwareTime = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with an offset")]


class ListQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    workflow_name: str | None = None
    status: Status | None = None
    channel_name: str | None = None
    created_after: AwareTime | None = None
    created_before: AwareTime | None = None
    limit: Limit = 100
    cursor: str | None = None


async def list_jobs(request: Request) -> Response:
    """GET /api/jobs: newest first, filtered, paged by an opaque cursor."""
    query = msgspec.convert(dict(request.query_params), ListQuery, strict=False)
    try:
        page = await app_state(request).kernel.list_jobs(JobQuery(**msgspec.structs.asdict(query)))
    except ValueError as exc:
        raise ApiError(422, str(exc), field="cursor") from None
    return json_response(JobList(items=[JobOut.of(j) for j in page.items],
                                 next_cursor=page.next_cursor))


async def job_events(request: Request) -> Response:
    """GET /api/jobs/{job_id}/events: the job's history with seq, time and hash."""
    job_id = request.path_params["job_id"]
    events = await app_state(request).kernel.job_events(job_id)
    if not events:
        raise ApiError(404, f"job {job_id} does not exist")
    return json_response([event_out(e) for e in events])


async def cancel_job(request: Request) -> Response:
    """POST /api/jobs/{job_id}/cancel: 409 when the job is already finished."""
    reason = await optional_reason(request)
    job = await app_state(request).kernel.cancel(
        request.path_params["job_id"], actor=actor(request), reason=reason)
    return json_response(JobOut.of(job))


async def retry_job(request: Request) -> Response:
    """POST /api/jobs/{job_id}/retry: 409 unless failed or cancelled, or the file is taken."""
    reason = await optional_reason(request)
    job = await app_state(request).kernel.retry(
        request.path_params["job_id"], actor=actor(request), reason=reason)
    return json_response(JobOut.of(job))


async def optional_reason(request: Request) -> str:
    if request.headers.get("content-length") in (None, "0") and \
            "transfer-encoding" not in request.headers:
        return ""
    body: Reason = await decode_json(request, Reason)
    return body.reason


async def workflow_status(request: Request) -> Response:
    """GET /api/{workflow_name}/status/{task_id}: 404 for a job of another workflow."""
    state = app_state(request)
    workflow_name = request.path_params["workflow_name"]
    if workflow_name not in state.kernel.manager.workflows:
        raise ApiError(404, f"no workflow named {workflow_name!r}")
    job = await state.kernel.get_job(request.path_params["task_id"])
    if job is None or job.workflow_name != workflow_name:
        raise ApiError(404, f"{workflow_name} has no task {request.path_params['task_id']}")
    return json_response(WorkflowStatus(job=JobOut.of(job), result=job.result))
