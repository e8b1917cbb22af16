"""Work run once per cluster (adapters/singleton.py): it stops before its lease can pass
to another node, whatever the database does meanwhile."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from adapters.singleton import run_singleton

pytestmark = pytest.mark.anyio
LEASE_S = 1.0
RENEW_S = 0.2


class HangingCluster:
    """hold_lease answers once; then every renewal hangs (a network partition: no error,
    no answer, for minutes)."""

    node_id = "node-a"

    def __init__(self) -> None:
        self.calls = 0

    async def hold_lease(self, name: str, lease_s: float) -> bool:
        self.calls += 1
        if self.calls == 1:
            return True
        await anyio.sleep_forever()
        return False


async def test_the_work_stops_before_its_lease_runs_out_when_renewal_hangs() -> None:
    """The renewal gives up in time: the work stops within the lease, before another node
    may take it over (it ran on, and both nodes delivered every webhook)."""
    stopped_at: float | None = None

    async def work(tg: anyio.abc.TaskGroup) -> None:
        async def deliver_for_ever() -> None:
            nonlocal stopped_at
            try:
                await anyio.sleep_forever()
            finally:
                stopped_at = anyio.current_time()

        tg.start_soon(deliver_for_ever)

    async with anyio.create_task_group() as tg:
        began = anyio.current_time()
        tg.start_soon(lambda: run_singleton(
            HangingCluster(), "notifications", work,  # type: ignore[arg-type]
            lease_s=LEASE_S, renew_s=RENEW_S))
        await anyio.sleep(LEASE_S * 2)
        tg.cancel_scope.cancel()
    assert stopped_at is not None and stopped_at - began < LEASE_S
