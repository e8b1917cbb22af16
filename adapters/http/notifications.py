"""Routes of the notifier: the dead-letter list, redelivery, and the alerts that fired."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from adapters.http.errors import ApiError
from adapters.http.jobs import app_state, json_response
from adapters.notify.records import AlertRecord, DeadLetter, NotificationStore
from adapters.notify.webhooks import SendFailed, redeliver


class AlertsOut(msgspec.Struct, frozen=True, kw_only=True):
    firing: dict[str, bool]
    history: list[AlertRecord]


def _records(request: Request) -> NotificationStore:
    store: Any = app_state(request).kernel.store
    if not hasattr(store, "list_dead_letters"):
        raise ApiError(404, "this store keeps no notification records")
    records: NotificationStore = store
    return records


async def dead_letters(request: Request) -> Response:
    """GET /api/notifications/dead: deliveries that exhausted their attempts."""
    letters: list[DeadLetter] = await _records(request).list_dead_letters(1000)
    return json_response(letters)


async def redeliver_letter(request: Request) -> Response:
    """POST /api/notifications/dead/{letter_id}/redeliver: one more try, now."""
    raw = request.path_params["letter_id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise ApiError(404, f"no dead letter {raw}")
    records = _records(request)
    letter = next((d for d in await records.list_dead_letters(100_000) if d.id == int(raw)), None)
    if letter is None:
        raise ApiError(404, f"no dead letter {raw}")
    targets = {t.name: t for t in app_state(request).settings.webhooks}
    target = targets.get(letter.target)
    if target is None:
        raise ApiError(409, f"the webhook {letter.target!r} is no longer configured")
    try:
        await redeliver(letter, target, app_state(request).kernel.store, records)
    except (SendFailed, TimeoutError) as exc:
        raise ApiError(502, f"the receiver still refuses it: {exc or 'timeout'}") from None
    return json_response({"redelivered": True, "id": letter.id})


async def alerts(request: Request) -> Response:
    """GET /api/alerts: which rules hold now, and what fired and cleared when."""
    state = app_state(request)
    engine = state.alerts
    history: list[AlertRecord] = await _records(request).list_alerts(1000)
    firing = dict(engine.firing) if engine is not None else {}
    return json_response(AlertsOut(firing=firing, history=history))
