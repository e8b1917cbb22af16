"""/openapi.json (OpenAPI 3.1, generated from the msgspec models) and /docs."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from adapters.http import schemas as s
from adapters.http.explain import Explanation
from adapters.http.notifications import AlertsOut
from adapters.notify.records import DeadLetter

REF = "#/components/schemas/{name}"
_MODELS = (s.JobOut, s.JobList, s.CreateJob, s.Reason, s.EventOut, s.WorkflowStatus,
           s.WorkflowOut, s.QueueOut, s.Health, s.Problem, DeadLetter, AlertsOut, Explanation)


def _ref(model: type) -> dict[str, str]:
    return {"$ref": REF.format(name=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answers(ok: int, model: dict[str, Any] | None, *errors: int) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    responses[str(ok)] = {"description": "OK"} if model is None else \
        {"description": "OK", "content": _json(model)}
    for status in (*errors, 401, 429):
        responses[str(status)] = {"description": "problem",
                                  "content": {"application/problem+json": {
                                      "schema": _ref(s.Problem)}}}
    return responses


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False
           ) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema}


JOB_ID = _param("job_id", "path", {"type": "string"})
WORKFLOW = _param("workflow_name", "path", {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"})
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _operations() -> dict[str, dict[str, Any]]:
    job = _ref(s.JobOut)
    return {
        "/api/jobs": {
            "post": {"summary": "Create a job for a file in the workflow's input/",
                     "requestBody": {"required": True, "content": _json(_ref(s.CreateJob))},
                     "responses": {**_answers(201, job, 400, 404, 413, 415, 422),
                                   "200": {"description": "the file's existing active job",
                                           "content": _json(job)}}},
            "get": {"summary": "List jobs, newest first",
                    "parameters": [
                        _param("workflow_name", "query", {"type": "string"}),
                        _param("status", "query", {"type": "string", "enum": [
                            "pending", "running", "completed", "failed", "cancelled"]}),
                        _param("channel_name", "query", {"type": "string"}),
                        _param("created_after", "query", {"type": "string", "format": "date-time"}),
                        _param("created_before", "query",
                               {"type": "string", "format": "date-time"}),
                        _param("limit", "query",
                               {"type": "integer", "minimum": 1, "maximum": 1000}),
                        _param("cursor", "query", {"type": "string"})],
                    "responses": _answers(200, _ref(s.JobList), 422)},
        },
        "/api/jobs/{job_id}": {"get": {"summary": "One job", "parameters": [JOB_ID],
                                       "responses": _answers(200, job, 404)}},
        "/api/jobs/{job_id}/events": {"get": {
            "summary": "A job's history (audit)", "parameters": [JOB_ID],
            "responses": _answers(200, {"type": "array", "items": _ref(s.EventOut)}, 404)}},
        "/api/jobs/{job_id}/explain": {"get": {
            "summary": "Why a job is not done: its place in the queue, its retry time, its file",
            "parameters": [JOB_ID], "responses": _answers(200, _ref(Explanation), 404)}},
        "/api/jobs/{job_id}/cancel": {"post": {
            "summary": "Cancel a pending or running job", "parameters": [JOB_ID],
            "requestBody": {"required": False, "content": _json(_ref(s.Reason))},
            "responses": _answers(200, job, 400, 404, 409, 415, 422)}},
        "/api/jobs/{job_id}/retry": {"post": {
            "summary": "Send a failed or cancelled job back to the queue", "parameters": [JOB_ID],
            "requestBody": {"required": False, "content": _json(_ref(s.Reason))},
            "responses": _answers(200, job, 400, 404, 409, 415, 422)}},
        "/api/{workflow_name}/process": {"post": {
            "summary": "Create a job of this workflow: JSON with file_path and the task's "
                       "parameters, or the file itself as application/octet-stream",
            "parameters": [WORKFLOW, _param("filename", "query", {"type": "string"}),
                           _param("Idempotency-Key", "header", {"type": "string"})],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}},
            "responses": {**_answers(201, job, 400, 404, 409, 413, 415, 422),
                          "200": {"description": "an existing job", "content": _json(job)}}}},
        "/api/{workflow_name}/status/{task_id}": {"get": {
            "summary": "A job of this workflow, with its result",
            "parameters": [WORKFLOW, _param("task_id", "path", {"type": "string"})],
            "responses": _answers(200, _ref(s.WorkflowStatus), 404)}},
        "/api/workflows": {"get": {"summary": "The registered workflows", "responses": _answers(
            200, {"type": "array", "items": _ref(s.WorkflowOut)})}},
        "/api/queue": {"get": {"summary": "Queue depth and running jobs",
                               "responses": _answers(200, _ref(s.QueueOut))}},
        "/api/events": {"get": {
            "summary": "The live event log as Server-Sent Events (resume with Last-Event-ID)",
            "parameters": [_param("after", "query", {"type": "integer", "minimum": 0}),
                           _param("Last-Event-ID", "header", {"type": "string"})],
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema": {
                                      "type": "string"}}}},
                          **{k: v for k, v in _answers(200, None, 422).items() if k != "200"}}}},
        "/api/notifications/dead": {"get": {
            "summary": "Webhook deliveries that exhausted their attempts",
            "responses": _answers(200, {"type": "array", "items": _ref(DeadLetter)}, 404)}},
        "/api/notifications/dead/{letter_id}/redeliver": {"post": {
            "summary": "Send a dead letter again, now",
            "parameters": [_param("letter_id", "path", {"type": "string"})],
            "responses": _answers(200, {"type": "object"}, 404, 409, 502)}},
        "/api/alerts": {"get": {"summary": "Alert rules firing now, and their history",
                                "responses": _answers(200, _ref(AlertsOut), 404)}},
        "/livez": {"get": {"summary": "Liveness", "security": [],
                           "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (503 while draining)", "security": [],
                            "responses": {"200": {"description": "ready",
                                                  "content": _json(_ref(s.Health))},
                                          "503": {"description": "not ready",
                                                  "content": _json(_ref(s.Health))}}}},
        "/healthz": {"get": {"summary": "The readiness checks", "security": [],
                             "responses": {"200": {"description": "checks",
                                                   "content": _json(_ref(s.Health))}}}},
    }


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API."""
    _, components = msgspec.json.schema_components(_MODELS, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "multiflow", "version": "1",
                 "description": "Hot folders in, jobs by priority, an auditable event log."},
        "paths": _operations(),
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": BEARER,
    }


_SPEC = msgspec.json.encode(build_spec())


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json."""
    return Response(_SPEC, media_type="application/json")


async def docs(request: Request) -> HTMLResponse:
    """GET /docs: renders /openapi.json in the browser, with no external network."""
    return HTMLResponse(DOCS_PAGE)


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>multiflow API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222}
h1{font-size:1.6rem} .op{border:1px solid #ddd;border-radius:6px;margin:.6rem 0;padding:.5rem .8rem}
.m{display:inline-block;min-width:4.5rem;font-weight:600;text-transform:uppercase}
.get{color:#1769aa}.post{color:#2e7d32} code{background:#f4f4f4;padding:0 .25rem}
details pre{background:#f7f7f7;padding:.5rem;overflow:auto;font-size:12px}
</style></head><body>
<h1>multiflow API</h1>
<p>Send <code>Authorization: Bearer TOKEN</code> with every call under <code>/api/</code>.
The machine-readable description is <a href="/openapi.json">/openapi.json</a>.</p>
<div id="ops">loading…</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(spec => {
  const root = document.getElementById('ops'); root.textContent = '';
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const box = document.createElement('div'); box.className = 'op';
      const head = document.createElement('div');
      const m = document.createElement('span'); m.className = 'm ' + method; m.textContent = method;
      const p = document.createElement('code'); p.textContent = path;
      head.append(m, p, document.createTextNode(' ' + (op.summary || '')));
      const more = document.createElement('details');
      const sum = document.createElement('summary'); sum.textContent = 'details';
      const pre = document.createElement('pre'); pre.textContent = JSON.stringify(op, null, 2);
      more.append(sum, pre); box.append(head, more); root.append(box);
    }
  }
});
</script></body></html>
"""
