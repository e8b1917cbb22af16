"""Starting the notifier: one consumer per webhook target, and the alert engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio.abc
import structlog

from adapters.notify.alerts import AlertEngine
from adapters.notify.records import NotificationStore
from adapters.notify.webhooks import WebhookConsumer, describe

if TYPE_CHECKING:
    from adapters.bootstrap import Kernel
    from adapters.config import Settings

log = structlog.get_logger("multiflow.notify")


async def start_notifications(kernel: Kernel, settings: Settings,
                              tg: anyio.abc.TaskGroup | None = None) -> AlertEngine | None:
    """Start the webhook consumers and the alert engine in `tg` (the kernel's task group
    by default; in a cluster, the task group of the node that holds the lease)."""
    group = tg if tg is not None else kernel._tg
    store: Any = kernel.store
    if not hasattr(store, "get_checkpoint"):
        if settings.webhooks or settings.alerts:
            log.warning("notifications_unsupported", store=type(store).__name__)
        return None
    records: NotificationStore = store
    for target in settings.webhooks:
        consumer = WebhookConsumer(target, kernel.store, records)
        await group.start(consumer.run)
        log.info("webhook_started", **describe(target))
    if not settings.alerts:
        return None
    engine = AlertEngine(kernel, settings.alerts, settings.webhooks, records)
    await group.start(engine.run)
    return engine
