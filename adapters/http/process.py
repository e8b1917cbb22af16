"""POST /api/{workflow_name}/process: a file by path (JSON) or the file itself (upload)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from adapters.http.errors import ApiError, plain_number
from adapters.http.jobs import app_state, created_response, decode_json
from adapters.http.schemas import Name, Priority
from kernel.decide import has_control_characters

OPTION_KEYS = ("file_path", "filename", "priority", "channel_name")


class Options(msgspec.Struct, frozen=True, kw_only=True):
    priority: Priority = 0
    channel_name: Name | None = None


async def process(request: Request) -> Response:
    """Create a job of this workflow; the task's parameters are validated by its BaseTask."""
    state = app_state(request)
    workflow_name = request.path_params["workflow_name"]
    if workflow_name not in state.kernel.manager.workflows:
        raise ApiError(404, f"no workflow named {workflow_name!r}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/octet-stream":
        return await _upload(request, workflow_name)
    body = await decode_json(request, dict[str, Any])
    file_path = body.pop("file_path", None)
    if not isinstance(file_path, str) or not file_path:
        raise ApiError(422, "file_path (relative to the workflow's input/) is required",
                       field="file_path")
    options = _options(body)
    submitted = await state.kernel.submit_file(
        workflow_name, file_path, priority=options.priority, channel_name=options.channel_name,
        params=body, completeness="api")
    return created_response(request, submitted.job, submitted.created)


def _options(values: dict[str, Any]) -> Options:
    picked = {key: values.pop(key) for key in ("priority", "channel_name") if key in values}
    return msgspec.convert(picked, Options, strict=False)


async def _upload(request: Request, workflow_name: str) -> Response:
    state = app_state(request)
    query = dict(request.query_params)
    filename = query.pop("filename", "")
    options = _options(query)
    key = request.headers.get("idempotency-key")
    if key is not None and (not key or len(key) > 255 or has_control_characters(key)):
        raise ApiError(422, "Idempotency-Key must be 1-255 characters, with no control "
                       "characters", field="Idempotency-Key")
    if key:
        earlier = await state.kernel.store.find_by_key(workflow_name, key)
        if earlier is not None:
            return created_response(request, earlier, False)
    await state.kernel.check_upload(workflow_name, filename)
    # Query strings are text: convert them to the task's types, and refuse bad ones before
    # a single byte of the upload lands anywhere.
    processor = state.kernel.manager.workflows[workflow_name].processor
    task = msgspec.convert(query, processor.Task, strict=False)
    params = msgspec.to_builtins(task)
    staged = await _stage(request, state.kernel.files.staging_dir(),
                          state.settings.upload_max_bytes)
    try:
        submitted = await state.kernel.submit_upload(
            workflow_name, filename, staged, priority=options.priority,
            channel_name=options.channel_name, params=params, idempotency_key=key)
    finally:
        await anyio.to_thread.run_sync(lambda: staged.unlink(missing_ok=True))
    return created_response(request, submitted.job, submitted.created)


async def _stage(request: Request, staging: Path, limit_bytes: int) -> Path:
    """Stream the body to a staging file; 413 (and no file left) past `limit_bytes`."""
    declared = plain_number(request.headers.get("content-length"))
    if declared is not None and declared > limit_bytes:
        raise ApiError(413, f"the upload is over the limit of {limit_bytes} bytes")
    path = staging / f"upload-{secrets.token_hex(8)}"
    size = 0
    try:
        async with await anyio.open_file(path, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit_bytes:
                    raise ApiError(413, f"the upload is over the limit of {limit_bytes} bytes")
                await handle.write(chunk)
            await handle.aclose()
    except BaseException:
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
        raise
    return path
