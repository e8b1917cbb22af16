"""Node liveness and cluster-wide leases on PostgreSQL (decision 0004).

A node's lease lives in `nodes`; the jobs it claimed (JobStarted.worker = its
node_id) are alive exactly while it is. A singleton (notifications, alerts, the
daily cleanup) runs on the node that holds its row in `leases`; another node takes
the row over once it has expired. Every time is the database's `now()`, so the
nodes' clocks need not agree.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Execute = Callable[[str, Sequence[object] | dict[str, object]], Awaitable[None]]
Fetch = Callable[[str, Sequence[object] | dict[str, object]], Awaitable[list[Any]]]

_HEARTBEAT = """
WITH old AS (SELECT lease_until FROM nodes WHERE node_id = %(node)s)
INSERT INTO nodes (node_id, host, pid, started_at, heartbeat_at, lease_until)
VALUES (%(node)s, %(host)s, %(pid)s, now(), now(), now() + make_interval(secs => %(lease)s))
ON CONFLICT (node_id) DO UPDATE
    SET heartbeat_at = now(), lease_until = EXCLUDED.lease_until
RETURNING coalesce((SELECT lease_until > now() FROM old), true)
"""
_HOLD = """
INSERT INTO leases (name, holder, lease_until)
VALUES (%(name)s, %(node)s, now() + make_interval(secs => %(lease)s))
ON CONFLICT (name) DO UPDATE
    SET holder = EXCLUDED.holder, lease_until = EXCLUDED.lease_until
    WHERE leases.holder = EXCLUDED.holder OR leases.lease_until < now()
RETURNING holder
"""
# Rows of nodes dead for a day only clutter the table: a job's liveness needs no row.
_FORGET = "DELETE FROM nodes WHERE lease_until < now() - interval '1 day'"


class Membership:
    """One node's view of the cluster tables, on the store's pool."""

    def __init__(self, node_id: str, execute: Execute, fetch: Fetch) -> None:
        self.node_id = node_id
        self._execute = execute
        self._fetch = fetch
        self._beats = 0

    async def heartbeat(self, lease_s: float) -> bool:
        """Renew this node's lease for `lease_s`; False if it had expired before."""
        rows = await self._fetch(_HEARTBEAT, {"node": self.node_id, "host": socket.gethostname(),
                                              "pid": os.getpid(), "lease": lease_s})
        self._beats += 1
        if self._beats % 100 == 1:
            await self._execute(_FORGET, ())
        return bool(rows[0][0])

    async def live_nodes(self) -> set[str]:
        """The nodes whose leases run now."""
        rows = await self._fetch("SELECT node_id FROM nodes WHERE lease_until > now()", ())
        return {row[0] for row in rows}

    async def leave(self) -> None:
        """End this node's lease and its singletons' leases now."""
        await self._execute("DELETE FROM leases WHERE holder = %s", (self.node_id,))
        await self._execute("DELETE FROM nodes WHERE node_id = %s", (self.node_id,))

    async def dead_nodes(self) -> list[str]:
        """Nodes whose leases expired (their rows stay until `forget_node`)."""
        rows = await self._fetch("SELECT node_id FROM nodes WHERE lease_until < now() "
                                 "ORDER BY lease_until", ())
        return [row[0] for row in rows]

    async def forget_node(self, node_id: str) -> None:
        """Drop a dead node's row (only if its lease is still expired)."""
        await self._execute("DELETE FROM nodes WHERE node_id = %s AND lease_until < now()",
                            (node_id,))

    async def hold_lease(self, name: str, lease_s: float) -> bool:
        """Take the lease `name` if free or expired, renew it if ours; True if ours now."""
        rows = await self._fetch(_HOLD, {"name": name, "node": self.node_id, "lease": lease_s})
        return bool(rows)

    async def release_lease(self, name: str) -> None:
        """Give the lease `name` up if this node holds it."""
        await self._execute("DELETE FROM leases WHERE name = %s AND holder = %s",
                            (name, self.node_id))
