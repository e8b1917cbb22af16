"""GET /api/events: the live log as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import msgspec
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request

from adapters.http.errors import ApiError
from adapters.http.jobs import app_state
from adapters.http.schemas import event_out

SEND_TIMEOUT_S = 10.0  # a client that cannot take an event this fast is disconnected
PING_S = 15.0
_json = msgspec.json.Encoder()
_SEQ = re.compile(r"[0-9]{1,19}")
SEQ_MAX = 2**63 - 1


async def stream(request: Request) -> EventSourceResponse:
    """Every event after `after` (or Last-Event-ID), then each new one as it commits."""
    after = _position(request)
    state = app_state(request)

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for stored in state.kernel.store.tail(after):
            out = event_out(stored)
            yield ServerSentEvent(data=_json.encode(out).decode(), event=out.type,
                                  id=str(stored.seq))

    return EventSourceResponse(events(), ping=PING_S, send_timeout=SEND_TIMEOUT_S,
                               shutdown_event=state.shutdown)


def _position(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not _SEQ.fullmatch(raw) or int(raw) > SEQ_MAX:
        raise ApiError(422, "after (or Last-Event-ID) must be a seq number", field="after")
    return int(raw)
