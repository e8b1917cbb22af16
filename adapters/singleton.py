"""Work that runs once for the whole cluster (notifications, alerts, the archive cleanup).

On one node it simply runs. On a shared store it runs on the node that holds the
cluster-wide lease of its name: that node renews the lease every `renew_s`; when it
cannot (the database is gone, or another node took the lease after it expired), it
stops the work; another node takes the lease over once it has expired. Work run this
way must tolerate being stopped at any point and started again elsewhere (webhook
deliveries resume from their durable checkpoints).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import structlog

from kernel.ports import Cluster, StoreError

log = structlog.get_logger("multiflow.cluster")
Work = Callable[[anyio.abc.TaskGroup], Awaitable[None]]


async def run_singleton(cluster: Cluster | None, name: str, work: Work, *,
                        lease_s: float = 15.0, renew_s: float = 3.0,
                        on_stop: Callable[[], None] | None = None,
                        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
    """Run `work(tg)` (which starts its tasks in `tg`) where the lease `name` is held."""
    if cluster is None:
        async with anyio.create_task_group() as tg:
            await work(tg)
            task_status.started()
        return
    task_status.started()
    while True:
        try:
            held = await cluster.hold_lease(name, lease_s)
        except StoreError:
            held = False
        if not held:
            await anyio.sleep(renew_s)
            continue
        log.info("singleton_acquired", singleton=name, node=cluster.node_id)
        async with anyio.create_task_group() as tg:
            await work(tg)
            await _renew(cluster, name, lease_s, renew_s)
            tg.cancel_scope.cancel()
        if on_stop is not None:
            on_stop()
        log.warning("singleton_lost", singleton=name, node=cluster.node_id)


async def _renew(cluster: Cluster, name: str, lease_s: float, renew_s: float) -> None:
    """Renew the lease until it is lost (or cannot be renewed before it runs out)."""
    renewed_s = anyio.current_time()
    while True:
        await anyio.sleep(renew_s)
        started_s = anyio.current_time()
        # A renewal that hangs (a partition: no reset, TCP retrying for minutes) must not
        # outlast the lease: another node takes it once it expires, and the work would run
        # on both. Give up in time to stop first.
        patience_s = max(0.05, renewed_s + lease_s - renew_s - started_s)
        try:
            with anyio.fail_after(patience_s):
                if not await cluster.hold_lease(name, lease_s):
                    return
        except (StoreError, TimeoutError):
            if anyio.current_time() - renewed_s >= lease_s - renew_s:
                return
            continue
        renewed_s = started_s
