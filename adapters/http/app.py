"""The Starlette application: routes, middleware, errors. Mountable in another ASGI app."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.http import dashboard, events, explain, jobs, notifications, openapi, ops, process
from adapters.http.errors import KNOWN_ERRORS, client_gone, handle_error, problem_response
from adapters.http.security import RateLimit, TokenAuth
from adapters.http.state import AppState


async def http_error(request: Request, exc: Exception) -> Response:
    """404/405 and other HTTP errors of the router, as problem documents."""
    assert isinstance(exc, HTTPException)
    return problem_response(exc.status_code, str(exc.detail), instance=request.url.path,
                            headers=dict(exc.headers or {}))


def routes() -> list[Route]:
    """Every route of the API."""
    return [
        Route("/api/jobs", jobs.create_job, methods=["POST"]),
        Route("/api/jobs", jobs.list_jobs, methods=["GET"]),
        Route("/api/jobs/{job_id}", jobs.get_job, methods=["GET"], name="get_job"),
        Route("/api/jobs/{job_id}/events", jobs.job_events, methods=["GET"]),
        Route("/api/jobs/{job_id}/explain", explain.explain, methods=["GET"]),
        Route("/api/jobs/{job_id}/cancel", jobs.cancel_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/retry", jobs.retry_job, methods=["POST"]),
        Route("/api/workflows", ops.workflows, methods=["GET"]),
        Route("/api/queue", ops.queue, methods=["GET"]),
        Route("/api/events", events.stream, methods=["GET"]),
        Route("/api/notifications/dead", notifications.dead_letters, methods=["GET"]),
        Route("/api/notifications/dead/{letter_id}/redeliver", notifications.redeliver_letter,
              methods=["POST"]),
        Route("/api/alerts", notifications.alerts, methods=["GET"]),
        Route("/api/{workflow_name}/process", process.process, methods=["POST"]),
        Route("/api/{workflow_name}/status/{task_id}", jobs.workflow_status, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/livez", ops.livez, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
        Route("/docs", openapi.docs, methods=["GET"]),
        Route("/", dashboard.index, methods=["GET"]),
        Route("/static/{path:path}", dashboard.static, methods=["GET"]),
    ]


def create_app(state: AppState) -> Starlette:
    """The API for one running kernel; `state.settings` holds auth and limits."""
    settings = state.settings
    middleware = [
        Middleware(TokenAuth, tokens=state.tokens, enabled=settings.auth == "on",
                   metrics_public=settings.metrics_public,
                   rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst),
        Middleware(RateLimit, rate_per_s=settings.rate_limit_per_s,
                   burst=settings.rate_limit_burst),
    ]
    # Known errors go to Starlette's inner exception middleware, which answers and is done;
    # a handler for plain `Exception` runs in the outer one, which re-raises (a logged
    # traceback and a closed connection), so only real 500s go there.
    handlers: dict[Any, Any] = {HTTPException: http_error, Exception: handle_error}
    handlers.update({kind: handle_error for kind in KNOWN_ERRORS})
    handlers[ClientDisconnect] = client_gone
    app = Starlette(routes=routes(), middleware=middleware, exception_handlers=handlers)
    app.state.multiflow = state
    return app
