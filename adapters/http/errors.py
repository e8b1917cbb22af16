"""Errors as `application/problem+json`, and the translation of kernel errors into them."""

from __future__ import annotations

import re

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from adapters.files import FileNotInInput, PathOutsideRoot
from adapters.http.schemas import Problem
from kernel.decide import Rejected
from kernel.ports import DuplicateJob, StoreFull, StoreUnavailable

log = structlog.get_logger("multiflow.http")
_problem = msgspec.json.Encoder()
_FIELD = re.compile(r"at `\$\.([^`\[]+)")
_REJECTED_STATUS = {"not_found": 404, "invalid": 422, "exists": 409,
                    "invalid_transition": 409, "stale_attempt": 409, "conflict": 409}
_TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
           413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable",
           507: "Insufficient Storage"}


class ApiError(Exception):
    """An error the API answers with a problem document; nothing was changed."""

    def __init__(self, status: int, detail: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field
        self.headers = headers or {}


def problem_response(status: int, detail: str, *, field: str | None = None,
                     instance: str | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    """A problem+json response."""
    body = Problem(title=_TITLES.get(status, "Error"), status=status, detail=detail,
                   field=field, instance=instance)
    return Response(_problem.encode(body), status_code=status, headers=headers,
                    media_type="application/problem+json")


def translate(exc: Exception) -> ApiError:
    """The API error for a kernel, store or validation error."""
    match exc:
        case ApiError():
            return exc
        case Rejected():
            found = _FIELD.search(exc.detail)
            return ApiError(_REJECTED_STATUS.get(exc.code, 409), exc.detail,
                            field=found.group(1) if found else None)
        case FileNotInInput():
            return ApiError(404, str(exc), field="file_path")
        case PathOutsideRoot():
            return ApiError(422, str(exc), field="file_path")
        case DuplicateJob():
            return ApiError(409, f"{exc.reason}: job {exc.existing_job_id}")
        case msgspec.ValidationError():
            found = _FIELD.search(str(exc))
            return ApiError(422, str(exc), field=found.group(1) if found else None)
        case msgspec.DecodeError():
            return ApiError(400, f"the body is not valid JSON: {exc}")
        case StoreFull():
            return ApiError(507, str(exc))
        case StoreUnavailable():
            return ApiError(503, str(exc), headers={"Retry-After": "5"})
    raise exc


KNOWN_ERRORS: tuple[type[Exception], ...] = (
    ApiError, Rejected, FileNotInInput, PathOutsideRoot, DuplicateJob, msgspec.ValidationError,
    msgspec.DecodeError, StoreFull, StoreUnavailable)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up mid-request (an upload stopped with Ctrl-C): nothing was changed,
    nobody is left to answer, and it is not a server error."""
    log.info("client_disconnected", path=request.url.path, method=request.method)
    return Response(status_code=499)


def plain_number(value: str | None) -> int | None:
    """A header's, query's or path's value as a whole number (ASCII digits, at most 19: a
    64-bit one), or None when absent or anything else ("²" is a digit to `str.isdigit`,
    and `int` refuses 5,000 digits)."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 19:
        return None
    return int(value)


async def handle_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: every known error becomes a problem document."""
    try:
        error = translate(exc)
    except Exception:
        log.exception("unhandled_error", path=request.url.path)
        return problem_response(500, "an unexpected error happened; it was logged",
                                instance=request.url.path)
    return problem_response(error.status, error.detail, field=error.field,
                            instance=request.url.path, headers=error.headers)
