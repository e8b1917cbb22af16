"""Routes of the notifier: the dead-letter list, redelivery, and the alerts that fired."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from adapters.http.errors import ApiError, plain_number
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
    """GET /api/notifications/dead?after=ID&limit=N: deliveries that exhausted their
    attempts, oldest first; page on with `after` = the last id of a page."""
    limit = _number(request, "limit", 1000, 1, 1000)
    after = _number(request, "after", 0, 0, 2**63 - 1)
    letters: list[DeadLetter] = await _records(request).list_dead_letters(limit, after)
    return json_response(letters)


def _number(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    number = plain_number(raw)
    if number is None or not low <= number <= high:
        raise ApiError(422, f"{name} must be a whole number within {low}..{high}", field=name)
    return number


async def redeliver_letter(request: Request) -> Response:
    """POST /api/notifications/dead/{letter_id}/redeliver: one more try, now."""
    raw = request.path_params["letter_id"]
    letter_id = plain_number(raw)
    if letter_id is None:
        raise ApiError(404, f"no dead letter {raw}")
    records = _records(request)
    found = await records.list_dead_letters(1, letter_id - 1)
    letter = found[0] if found and found[0].id == letter_id else None
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
