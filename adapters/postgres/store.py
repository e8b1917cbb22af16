"""The EventStore on PostgreSQL (psycopg 3, async, pooled): one log for several nodes.

Appends are serialised across every node by `LOCK TABLE events IN EXCLUSIVE MODE`
inside the appending transaction (as the `eventsourcing` library does): the
appender reads the head (seq, hash) under the lock, so seq is gapless, readers
never see N+1 before N, and the hash chain stays one chain. Readers take no
lock. Within a node, appends issued together share one transaction (group
commit); each is checked against the rows read under the lock, so a claim by
expected version is decided by the database, whichever node makes it.

Claims (`append_claims`) are taken in the same transaction, under the same lock:
the cluster-wide limits are checked against the `jobs` table as the lock leaves
it, so no two nodes can exceed them together. Each event row names the node that
appended it; a node follows the others' events (`tail_others`), woken by
LISTEN/NOTIFY, with polling behind it since notifications are not durable. Node
liveness and the singletons' leases are in `adapters/postgres/cluster.py`
(decision 0004).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import msgspec
import psycopg
import psycopg.errors
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from adapters.ledger import Batch, Ledger, refuse_if_unmet
from adapters.memory import page_of
from adapters.notify.records import AlertRecord, DeadLetter
from adapters.postgres import schema
from adapters.postgres.cluster import Membership
from adapters.postgres.commit import Committer, Request, requests_of
from adapters.postgres.feed import Feed, messages, parse, stored_of
from adapters.sqlrows import (
    ACTIVE_SQL,
    JOB_COLUMNS,
    UPSERT_JOB,
    alert_of,
    dead_letter_of,
    job_decoder,
    job_row,
    where_clause,
)
from kernel.chain import ChainRow
from kernel.events import JobCreated, JobRetried, decode_event
from kernel.ports import (
    Append,
    ClaimLimits,
    ConcurrencyConflict,
    JobPage,
    JobQuery,
    NotClaimed,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from kernel.state import Job, Status, StoredEvent

# The head, the rows of the jobs appended to, and the running jobs per workflow: one row
# each, tagged by kind (h, j, c), so that one statement reads what the lock guards.
_STATE_HEAD_JOBS = (
    "(SELECT 'h', NULL, hash, seq FROM events ORDER BY seq DESC LIMIT 1) UNION ALL "
    "SELECT 'j', id, body, version FROM jobs WHERE id = ANY(%b)")
_STATE_SQL = (_STATE_HEAD_JOBS + " UNION ALL SELECT 'c', workflow_name, NULL, count(*) "
              "FROM jobs WHERE status = 'running' GROUP BY workflow_name")
_STATE_SQL_UNCOUNTED = _STATE_HEAD_JOBS
JOB_ROW_TYPES = ("text", "text", "text", "text", "text", "int", "text", "bigint", "bigint",
                 "bigint", "bigint", "int", "text")  # job_row's columns, in JOB_COLUMNS order
# A group's rows go as three JSON documents (events, job rows, notifications), unpacked by
# the server: psycopg dumps an array parameter element by element (~230 us for a group of
# four events and its job rows, all of it while the log's lock is held), where msgspec
# encodes the same rows in ~15 us. (Text-format arrays were worse still: a regular
# expression per quote of every JSON payload.) `json`, not `jsonb`: parsed once, with no
# size limit of its own on a string (a jsonb string stops at 256 MB).
_EVENT_KEYS = ("s", "j", "v", "t", "a", "p", "h")
_JOB_KEYS = tuple(JOB_COLUMNS.split(", "))
_WRITE_SQL = (
    "WITH e AS (INSERT INTO events (seq, job_id, version, type, at, payload, hash, node) "
    "SELECT s, j, v, t, a, p, h, %s FROM json_to_recordset(%s::json) AS "
    "r(s bigint, j text, v int, t text, a text, p text, h text)), "
    "u AS (" + UPSERT_JOB.split(" VALUES ")[0] + " SELECT * FROM json_to_recordset(%s::json) "
    "AS r(" + ", ".join(f"{k} {t}" for k, t in zip(_JOB_KEYS, JOB_ROW_TYPES, strict=True)) +
    ") ON CONFLICT" + UPSERT_JOB.split("ON CONFLICT", 1)[1] + ") "
    "SELECT pg_notify(%s, m) FROM json_array_elements_text(%s::json) AS m")
_rows_encoder = msgspec.json.Encoder()
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
POLL_S = 0.5  # how often a follower looks for other nodes' events when no NOTIFY came
StoreResult = list[StoredEvent] | StoreError


def default_node_id() -> str:
    """host:pid:random: unique per process, so a restarted node never renews the lease of
    its previous life (whose jobs must be recovered)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def notify_channel(schema_name: str) -> str:
    """The NOTIFY channel of one schema's log (two logs in one database stay apart)."""
    return f"multiflow_{schema_name}"


def split_url(url: str) -> tuple[str, str]:
    """The libpq URL without our `schema=` parameter, and that schema (default `multiflow`)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    name = query.pop("schema", "multiflow")
    if not _SCHEMA_NAME.match(name):
        raise ValueError(f"schema {name!r} must match {_SCHEMA_NAME.pattern}")
    return urlunsplit(parts._replace(query=urlencode(query))), name


def translate(exc: Exception, where: str) -> StoreError:
    """The store's own error for a driver error."""
    if isinstance(exc, psycopg.errors.DiskFull):
        return StoreFull(f"the database server's disk is full; nothing was written: {exc}")
    if isinstance(exc, psycopg.errors.IntegrityError):
        return StoreError(f"the log refused the append: {exc}")
    if isinstance(exc, psycopg.OperationalError | PoolTimeout | psycopg.InterfaceError):
        return StoreUnavailable(f"PostgreSQL at {where} is unreachable: {exc}")
    return StoreError(f"PostgreSQL at {where} failed: {exc}")


class PostgresEventStore:
    """The EventStore on PostgreSQL; see the module docstring for the write path."""

    def __init__(self, pool: AsyncConnectionPool, where: str, schema_name: str,
                 conninfo: str = "", node_id: str | None = None) -> None:
        self._pool = pool
        self.where = where
        self.schema_name = schema_name
        self.conninfo = conninfo
        self.node_id = node_id or default_node_id()
        self.channel = notify_channel(schema_name)
        self._feed = Feed()
        self._committer = Committer(self._write_group, self._written)
        self._membership = Membership(self.node_id, self._execute, self._fetch)
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, pool_max: int = 10, node_id: str | None = None
                   ) -> PostgresEventStore:
        """Connect, create the schema if needed and migrate it (one node at a time)."""
        conninfo, schema_name = split_url(url)
        where = urlsplit(conninfo).netloc.rpartition("@")[2] or "localhost"

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(sql.SQL("SET search_path TO {}").format(
                sql.Identifier(schema_name)))

        pool = AsyncConnectionPool(conninfo, min_size=1, max_size=pool_max, open=False,
                                   kwargs={"autocommit": True}, configure=configure,
                                   timeout=10.0)
        try:
            await pool.open(wait=True, timeout=10.0)
            await _migrate(pool, schema_name)
        except (psycopg.Error, PoolTimeout) as exc:
            await pool.close()
            raise translate(exc, where) from exc
        return cls(pool, where, schema_name, conninfo, node_id)

    # -- writes ----------------------------------------------------------------------

    async def append(self, job_id: str, events: Sequence[Any], expected_version: int
                     ) -> list[StoredEvent]:
        """Append atomically (see the EventStore port)."""
        (result,) = await self.append_batch([Append(job_id, events, expected_version)])
        if isinstance(result, StoreError):
            raise result
        return result

    async def append_batch(self, appends: Sequence[Append]) -> list[StoreResult]:
        """Several appends in one transaction; each succeeds or fails on its own."""
        return await self._submit(requests_of(appends))

    async def append_claims(
        self, appends: Sequence[Append], candidates: Sequence[Append], limits: ClaimLimits
    ) -> tuple[list[StoreResult], list[StoreResult]]:
        """`appends`, then the candidates that `limits` allow, in one transaction."""
        results = await self._submit(requests_of([*appends, *candidates], limits,
                                                 len(candidates)))
        return results[: len(appends)], results[len(appends):]

    async def _submit(self, requests: list[Request]) -> list[StoreResult]:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        await self._committer.submit(requests)
        return [r.error if r.error is not None else r.result for r in requests]

    def _written(self) -> None:
        # A live feed gets our own events from the listener, in order with the others'.
        if not self._feed.live:
            self._feed.published()

    async def _write_group(self, requests: list[Request]) -> None:
        # One pipeline: BEGIN, the lock and every read go out together, then the rows and
        # COMMIT: two round trips and one fsync, however many appends the group holds.
        # BEGIN and COMMIT are plain statements in it: `conn.transaction()` there cost a
        # third of a millisecond more per commit, held under the log's lock. A statement
        # that fails skips the rest, COMMIT included; the pool's connection block then
        # rolls the transaction back (`async with conn`) before the connection goes back.
        try:
            async with self._pool.connection() as conn, conn.pipeline():
                await conn.execute("BEGIN")
                batch = await self._prepare(conn, requests)
                if batch.rows:
                    await self._insert(conn, batch)
                await conn.execute("COMMIT")
        except (psycopg.Error, PoolTimeout) as exc:
            error = translate(exc, self.where)
            units = _units(requests)
            if len(units) > 1 and not isinstance(error, StoreUnavailable | StoreFull):
                # The server refused something in the group (a value it cannot take, an
                # operator's trigger or constraint): nothing was written. Write each append
                # (each claim with its candidates) in a transaction of its own, so only
                # what the server refuses fails, not the outcomes grouped beside it.
                for unit in units:
                    for request in unit:
                        request.result, request.error = [], None
                    await self._write_group(unit)
                return
            for request in requests:
                if request.error is None:
                    request.result, request.error = [], error

    async def _prepare(self, conn: psycopg.AsyncConnection[Any], requests: list[Request]
                       ) -> Batch:
        """Read under the lock what the appends are checked against; stage them."""
        await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        claims = [r for r in requests if r.limits is not None]
        created = [e for r in requests for e in r.events if isinstance(e, JobCreated)]
        retried = [r.job_id for r in requests if any(isinstance(e, JobRetried) for e in r.events)]
        keyed = {(e.workflow_name, e.idempotency_key) for e in created
                 if e.idempotency_key is not None}
        # The head, the jobs appended to and (for claims under a limit) the running counts,
        # in one statement: each statement in the pipeline costs as much as its rows.
        counted = any(r.limits.running is not None or r.limits.per_workflow for r in claims
                      if r.limits is not None)
        state = await conn.execute(_STATE_SQL if counted else _STATE_SQL_UNCOUNTED,
                                   (list({r.job_id for r in requests}),))
        files = await conn.execute(
            f"SELECT workflow_name, file_path, id FROM jobs WHERE status IN {ACTIVE_SQL} AND ("
            "(workflow_name, file_path) IN (SELECT * FROM unnest(%b::text[], %b::text[])) OR "
            "(workflow_name, file_path) IN (SELECT workflow_name, file_path FROM jobs "
            "WHERE id = ANY(%b)))",
            ([e.workflow_name for e in created], [e.file_path for e in created], retried)
        ) if created or retried else None
        keys = await conn.execute(
            "SELECT workflow_name, idempotency_key, id FROM jobs WHERE (workflow_name, "
            "idempotency_key) IN (SELECT * FROM unnest(%b::text[], %b::text[]))",
            ([w for w, _ in keyed], [k for _, k in keyed])) if keyed else None

        top: tuple[int, str] | None = None
        bodies: dict[str, str] = {}
        versions: dict[str, int] = {}  # of the jobs read: checked before any is decoded
        running: dict[str, int] = {}
        for kind, key, value, number in await state.fetchall():
            if kind == "j":
                bodies[key] = value
                versions[key] = number
            elif kind == "h":
                top = (number, value)
            else:
                running[key] = number
        ledger = Ledger(top[0], top[1]) if top else Ledger()
        known: dict[str, Job] = {}

        def load(job_id: str) -> Job | None:  # decoded only when an append needs it
            job = known.get(job_id)
            if job is None and job_id in bodies:
                job = known[job_id] = job_decoder.decode(bodies[job_id])
            return job

        if files is not None:
            ledger.files.update({(r[0], r[1]): r[2] for r in await files.fetchall()})
        owners = {(r[0], r[1]): r[2] for r in await keys.fetchall()} if keys else {}
        batch = ledger.begin(load, lambda wf, key: owners.get((wf, key)))
        for request in requests:
            if request.limits is None and not refuse_if_unmet(request):
                _stage(batch, request)
        if claims:
            _count_changes(running, known, batch)
            _take_claims(batch, claims, running, versions)
        return batch

    async def _insert(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> None:
        rows = batch.rows
        jobs = [job_row(job) for job in batch.jobs.values()]
        payloads = [r.payload.decode() for r in rows]
        # The rows themselves go to every listening node (adapters/postgres/feed.py).
        notes = messages(self.node_id, [(r.stored.seq, r.stored.job_id, r.stored.version,
                                         r.stored.hash, payload)
                                        for r, payload in zip(rows, payloads, strict=True)])
        # Events, job rows and notifications in one statement.
        await conn.execute(_WRITE_SQL, (
            self.node_id,
            _rows_encoder.encode([dict(zip(_EVENT_KEYS, (
                r.stored.seq, r.stored.job_id, r.stored.version, r.type_tag,
                r.stored.event.at.isoformat(), payload, r.stored.hash), strict=True))
                for r, payload in zip(rows, payloads, strict=True)]).decode(),
            _rows_encoder.encode([dict(zip(_JOB_KEYS, row, strict=True))
                                  for row in jobs]).decode(),
            self.channel, _rows_encoder.encode(notes).decode()))

    # -- reads -----------------------------------------------------------------------

    async def _fetch(self, query: str, params: Sequence[object] | dict[str, object] = ()
                     ) -> list[Any]:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        try:
            async with self._pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise translate(exc, self.where) from exc

    async def read_job(self, job_id: str) -> list[StoredEvent]:
        """Every event of one job, in version order."""
        return _stored(await self._fetch(
            "SELECT seq, job_id, version, payload, hash FROM events WHERE job_id = %s "
            "ORDER BY version", (job_id,)))

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events with seq > `after`, in seq order."""
        return _stored(await self._fetch(
            "SELECT seq, job_id, version, payload, hash FROM events WHERE seq > %s "
            "ORDER BY seq LIMIT %s", (after, limit)))

    async def read_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        """Raw rows for the hash chain: the payload bytes exactly as stored."""
        rows = await self._fetch(
            "SELECT seq, job_id, version, type, payload, hash FROM events WHERE seq > %s "
            "ORDER BY seq LIMIT %s", (after, limit))
        return [ChainRow(r[0], r[1], r[2], r[3], r[4].encode(), r[5]) for r in rows]

    async def tail(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event after `after`, then each new one as it is committed (any node).

        The database going away does not end it: it waits, reconnecting with backoff.
        """
        async for stored in self._follow_log(after, others=False):
            yield stored

    async def _read_all_patiently(self, after: int, limit: int) -> list[StoredEvent]:
        events: list[StoredEvent] = await self._patiently(self.read_all, after, limit)
        return events

    async def _patiently(self, read: Any, *args: object) -> Any:
        """`read(*args)`, retried with backoff while the database is unreachable."""
        failures = 0
        while True:
            try:
                return await read(*args)
            except StoreUnavailable:
                if self._closed:
                    raise
                failures += 1
                await anyio.sleep(min(5.0, 0.05 * 2**min(failures, 7)))

    async def tail_others(self, after: int = 0) -> AsyncIterator[StoredEvent]:
        """Every event after `after` that another node appended, as they are committed
        (waiting out a lost database, like `tail`)."""
        async for stored in self._follow_log(after, others=True):
            yield stored

    async def _follow_log(self, after: int, *, others: bool) -> AsyncIterator[StoredEvent]:
        """The events after `after` (only other nodes' if `others`): from the feed while
        it holds them, else from the table; polling the table when nothing came for
        POLL_S, since notifications are not durable."""
        feed = self._feed
        while True:
            held = feed.after(after)
            if held:
                for stored, node in held:
                    after = stored.seq
                    if not others or node != self.node_id:
                        yield stored
                continue
            if held is not None:  # caught up with a live feed: wait for the next events
                head = feed.head
                await feed.wait(POLL_S)
                if not feed.live or feed.head != head:
                    continue
            rows = await self._patiently(self._read_rows, after, others)
            for seq, stored in rows:
                after = seq
                if stored is not None:
                    yield stored
            if len(rows) < 1000 and not feed.live:
                await feed.wait(POLL_S)

    async def _read_rows(self, after: int, others: bool) -> list[tuple[int, StoredEvent | None]]:
        """Up to 1000 events after `after`, with their seqs; with `others`, None for this
        node's own (not even decoded)."""
        if not others:
            return [(stored.seq, stored) for stored in await self.read_all(after, 1000)]
        rows = await self._fetch(
            "SELECT seq, job_id, version, CASE WHEN node <> %s THEN payload END, hash "
            "FROM events WHERE seq > %s ORDER BY seq LIMIT 1000", (self.node_id, after))
        return [(row[0], None if row[3] is None else _stored_row(row)) for row in rows]

    async def listen(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                     ) -> None:
        """Receive every node's commits (LISTEN) into this node's feed, reconnecting with
        backoff; while it is away, the tailers read the table."""
        task_status.started()
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
                async with conn:
                    try:
                        await conn.execute(sql.SQL("LISTEN {}").format(
                            sql.Identifier(self.channel)))
                        # Whatever commits from here on is notified: the feed starts at the
                        # head.
                        self._feed.start(await self.last_seq())
                        failures = 0
                        # Closed here, not by the garbage collector: the generator holds the
                        # connection's lock, which closing the connection needs.
                        async with contextlib.aclosing(conn.notifies()) as notes:
                            async for note in notes:
                                await self._take(note.payload)
                    finally:
                        self._feed.stop()  # at once: the tailers read the table meanwhile
            except (psycopg.Error, StoreError):
                failures += 1
                await anyio.sleep(min(5.0, 0.1 * 2**min(failures, 6)))

    async def _take(self, payload: str) -> None:
        """Put one notification's events into the feed, reading from the table whatever
        it does not carry (a group too large, a gap, a message of another version)."""
        feed = self._feed
        message = parse(payload)
        if message is None:
            await self._fill(None)
        elif message.rows is None:
            await self._fill(message.last)
        else:
            if message.first > feed.head + 1:
                await self._fill(message.first - 1)
            for row in message.rows:
                if row[0] > feed.head:
                    feed.add(stored_of(row), message.node)
        feed.published()

    async def _fill(self, until: int | None) -> None:
        """Read the events after the feed's head (up to `until`) from the table into it."""
        feed = self._feed
        while until is None or feed.head < until:
            rows = await self._fetch(
                "SELECT seq, job_id, version, hash, payload, node FROM events WHERE seq > %s "
                "AND seq <= %s ORDER BY seq LIMIT 1000",
                (feed.head, until if until is not None else 2**62))
            for seq, job_id, version, chain_hash, payload, node in rows:
                feed.add(stored_of((seq, job_id, version, chain_hash, payload)), node)
            if len(rows) < 1000:
                return

    # -- several nodes (see adapters/postgres/cluster.py) ------------------------------

    async def heartbeat(self, lease_s: float) -> bool:
        """Renew this node's lease; False if it had expired meanwhile."""
        return await self._membership.heartbeat(lease_s)

    async def live_nodes(self) -> set[str]:
        """The nodes whose leases have not expired."""
        return await self._membership.live_nodes()

    async def running_jobs(self) -> list[Job]:
        """Every running job, on whichever node."""
        rows = await self._fetch("SELECT body FROM jobs WHERE status = 'running' "
                                 "ORDER BY created_seq")
        return [job_decoder.decode(body) for (body,) in rows]

    async def dead_nodes(self) -> list[str]:
        """Nodes whose leases expired and that nobody cleaned up after yet."""
        return await self._membership.dead_nodes()

    async def finished_by(self, node_id: str) -> list[Job]:
        """Jobs that ended while `node_id` held them, since it started."""
        rows = await self._fetch(
            "SELECT j.body FROM jobs j JOIN nodes n ON n.node_id = %s "
            "WHERE j.status IN ('completed', 'failed', 'cancelled') "
            "AND j.updated_us >= (extract(epoch FROM n.started_at) * 1000000)::bigint "
            "AND j.body::json->>'worker' = %s ORDER BY j.created_seq", (node_id, node_id))
        return [job_decoder.decode(body) for (body,) in rows]

    async def forget_node(self, node_id: str) -> None:
        """Drop a dead node's row once it has been cleaned up after."""
        await self._membership.forget_node(node_id)

    async def leave(self) -> None:
        """End this node's lease and give up the leases it holds."""
        await self._membership.leave()

    async def hold_lease(self, name: str, lease_s: float) -> bool:
        """Take or renew a cluster-wide lease; True while this node holds it."""
        return await self._membership.hold_lease(name, lease_s)

    async def release_lease(self, name: str) -> None:
        """Give up a cluster-wide lease this node holds."""
        await self._membership.release_lease(name)

    async def last_seq(self) -> int:
        """The newest committed seq (0 when empty)."""
        rows = await self._fetch("SELECT coalesce(max(seq), 0) FROM events")
        return int(rows[0][0])

    async def get_job(self, job_id: str) -> Job | None:
        """The read-model row of one job."""
        return _one(await self._fetch("SELECT body FROM jobs WHERE id = %s", (job_id,)))

    async def find_active(self, workflow_name: str, file_path: str) -> Job | None:
        """The active job that owns a file."""
        return _one(await self._fetch(
            f"SELECT body FROM jobs WHERE workflow_name = %s AND file_path = %s "
            f"AND status IN {ACTIVE_SQL}", (workflow_name, file_path)))

    async def find_by_key(self, workflow_name: str, idempotency_key: str) -> Job | None:
        """The job created with this idempotency key."""
        return _one(await self._fetch(
            "SELECT body FROM jobs WHERE workflow_name = %s AND idempotency_key = %s",
            (workflow_name, idempotency_key)))

    async def latest_jobs(self, workflow_name: str, file_paths: Sequence[str]) -> dict[str, Job]:
        """For each of these files that ever had a job, its most recent job."""
        latest: dict[str, Job] = {}
        for start in range(0, len(file_paths), 1000):
            rows = await self._fetch(
                "SELECT body FROM jobs WHERE workflow_name = %s AND file_path = ANY(%s) "
                "ORDER BY created_seq", (workflow_name, list(file_paths[start : start + 1000])))
            for (body,) in rows:
                job = job_decoder.decode(body)
                latest[job.file_path] = job
        return latest

    async def active_jobs(self, workflow_name: str | None = None) -> list[Job]:
        """Pending and running jobs, oldest first."""
        query = f"SELECT body FROM jobs WHERE status IN {ACTIVE_SQL}"
        params: tuple[object, ...] = ()
        if workflow_name is not None:
            query, params = query + " AND workflow_name = %s", (workflow_name,)
        rows = await self._fetch(query + " ORDER BY created_seq", params)
        return [job_decoder.decode(body) for (body,) in rows]

    async def list_jobs(self, query: JobQuery) -> JobPage:
        """A page of jobs, newest first, after the cursor."""
        where, params = where_clause(query, "%s")
        rows = await self._fetch(
            f"SELECT body FROM jobs {where} ORDER BY created_seq DESC LIMIT %s",
            (*params, query.limit + 1))
        return page_of([job_decoder.decode(body) for (body,) in rows], query.limit)

    async def count_jobs(self) -> dict[tuple[str, str], int]:
        """Jobs per (workflow, status)."""
        rows = await self._fetch(
            "SELECT workflow_name, status, count(*) FROM jobs GROUP BY workflow_name, status")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # -- notifier state ----------------------------------------------------------------

    async def get_checkpoint(self, name: str) -> int | None:
        """The seq a consumer has handled up to (None if it never ran)."""
        rows = await self._fetch("SELECT seq FROM checkpoints WHERE name = %s", (name,))
        return int(rows[0][0]) if rows else None

    async def set_checkpoint(self, name: str, seq: int) -> None:
        """Record that the consumer `name` has handled every event up to `seq`."""
        await self._execute(
            "INSERT INTO checkpoints (name, seq, updated_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at",
            (name, seq, datetime.now(UTC).isoformat()))

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """Keep a delivery that exhausted its attempts (once per target and seq)."""
        await self._execute(
            "INSERT INTO dead_letters (target, seq, job_id, event_type, attempts, last_error, "
            "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (letter.target, letter.seq, letter.job_id, letter.event_type, letter.attempts,
             letter.last_error, letter.created_at.isoformat()))

    async def list_dead_letters(self, limit: int = 100, after_id: int = 0) -> list[DeadLetter]:
        """The dead letters with ids past `after_id`, oldest first."""
        rows = await self._fetch(
            "SELECT id, target, seq, job_id, event_type, attempts, last_error, created_at "
            "FROM dead_letters WHERE id > %s ORDER BY id LIMIT %s", (after_id, limit))
        return [dead_letter_of(row) for row in rows]

    async def remove_dead_letter(self, letter_id: int) -> None:
        """Forget a dead letter (it was redelivered)."""
        await self._execute("DELETE FROM dead_letters WHERE id = %s", (letter_id,))

    async def record_alert(self, record: AlertRecord) -> None:
        """Keep an alert that fired or cleared."""
        await self._execute("INSERT INTO alerts (rule, state, at, detail) VALUES (%s, %s, %s, %s)",
                            (record.rule, record.state, record.at.isoformat(), record.detail))

    async def list_alerts(self, limit: int = 100) -> list[AlertRecord]:
        """The alerts, newest first."""
        rows = await self._fetch(
            "SELECT id, rule, state, at, detail FROM alerts ORDER BY id DESC LIMIT %s", (limit,))
        return [alert_of(row) for row in rows]

    async def _execute(self, query: str, params: Sequence[object] | dict[str, object]) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        try:
            async with self._pool.connection() as conn:
                await conn.execute(query, params)
        except (psycopg.Error, PoolTimeout) as exc:
            raise translate(exc, self.where) from exc

    async def close(self) -> None:
        """Finish queued appends, leave the cluster, then close the pool."""
        if self._closed:
            return
        await self._committer.drained()
        # Unreachable: the lease simply runs out and other nodes recover our jobs.
        with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                contextlib.suppress(StoreError):
            await self._membership.leave()
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._pool.close()


async def write_rows(conn: psycopg.AsyncConnection[Any], events: Sequence[tuple[object, ...]],
                     jobs: list[Job]) -> None:
    """Insert event rows (seq, job_id, version, type, at, payload, hash, node) and upsert
    job rows."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO events (seq, job_id, version, type, at, payload, hash, node) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", events)
        await cur.executemany(UPSERT_JOB, [job_row(job) for job in jobs])


async def _migrate(pool: AsyncConnectionPool, schema_name: str) -> None:
    async with pool.connection() as conn, conn.transaction():
        # One node migrates at a time; the others wait here and find it done.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('multiflow-migrate'))")
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
            sql.Identifier(schema_name)))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(
            sql.Identifier(schema_name)))
        await conn.execute(schema.META_TABLE)
        row = await (await conn.execute(
            "SELECT value FROM multiflow_meta WHERE key = 'schema_version'")).fetchone()
        found = int(row[0]) if row else 0
        if found > schema.SCHEMA_VERSION:
            raise StoreError(f"the log has schema {found}; this multiflow knows up to "
                             f"{schema.SCHEMA_VERSION}: upgrade it")
        for number in range(found + 1, schema.SCHEMA_VERSION + 1):
            for statement in schema.MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    await conn.execute(statement)
        await conn.execute(
            "INSERT INTO multiflow_meta (key, value) VALUES ('schema_version', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(schema.SCHEMA_VERSION),))


def _stage(batch: Batch, request: Request) -> bool:
    """Prepare one append in the batch; False (and `request.error` set) if refused."""
    rows = batch.try_prepare(request.job_id, request.events, request.expected_version)
    if isinstance(rows, StoreError):
        request.error = rows
        return False
    request.result = [row.stored for row in rows]
    return True


def _units(requests: list[Request]) -> list[list[Request]]:
    """The group split into what can be written alone: each append on its own, each
    claim's candidates together (its slots are counted across them)."""
    units: list[list[Request]] = []
    claims: dict[int, list[Request]] = {}
    for request in requests:
        if request.limits is None:
            units.append([request])
        elif id(request.limits) in claims:
            claims[id(request.limits)].append(request)
        else:
            claims[id(request.limits)] = [request]
            units.append(claims[id(request.limits)])
    return units


def _count_changes(running: dict[str, int], before: dict[str, Job], batch: Batch) -> None:
    """Bring the running counts read under the lock up to the appends staged so far."""
    for job_id, job in batch.jobs.items():
        old = before.get(job_id)
        was = old is not None and old.status is Status.RUNNING
        now = job.status is Status.RUNNING
        if was != now:
            running[job.workflow_name] = running.get(job.workflow_name, 0) + (1 if now else -1)


def _take_claims(batch: Batch, claims: list[Request], running: dict[str, int],
                 versions: dict[str, int]) -> None:
    """Stage the candidates in order while their claim's limits allow (see ClaimLimits).

    A candidate whose job moved on (taken elsewhere) is a ConcurrencyConflict, whatever
    its claim's slots; the spares left once the slots are taken are NotClaimed, their
    rows never decoded."""
    total = sum(running.values())
    taken: dict[int, int] = {}  # per claim (its limits object): candidates started
    for request in claims:
        limits = request.limits
        assert limits is not None
        if refuse_if_unmet(request):
            continue
        staged = batch.jobs.get(request.job_id)
        actual = staged.version if staged is not None else versions.get(request.job_id, 0)
        if actual != request.expected_version or actual == 0:
            request.error = ConcurrencyConflict(request.job_id, request.expected_version, actual)
            continue
        if taken.get(id(limits), 0) >= limits.slots:
            request.error = NotClaimed(f"job {request.job_id} not claimed: the claim is full")
            continue
        job = batch.current(request.job_id)
        assert job is not None  # (read with its version above)
        workflow = job.workflow_name
        cap = limits.per_workflow.get(workflow)
        if (limits.running is not None and total >= limits.running) or \
                (cap is not None and running.get(workflow, 0) >= cap):
            request.error = NotClaimed(f"job {request.job_id} not claimed: a limit is reached")
            continue
        if _stage(batch, request):
            taken[id(limits)] = taken.get(id(limits), 0) + 1
            total += 1
            running[workflow] = running.get(workflow, 0) + 1


def _stored(rows: list[Any]) -> list[StoredEvent]:
    return [_stored_row(r) for r in rows]


def _stored_row(r: Any) -> StoredEvent:
    """One row of (seq, job_id, version, payload, hash) as a StoredEvent."""
    return StoredEvent(seq=r[0], job_id=r[1], version=r[2], event=decode_event(r[3]), hash=r[4])


def _one(rows: list[Any]) -> Job | None:
    return job_decoder.decode(rows[0][0]) if rows else None
