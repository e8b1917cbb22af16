"""Routes for the queue, the workflows, health and readiness."""

from __future__ import annotations

import shutil
from collections import Counter

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from adapters.http.jobs import app_state, json_response
from adapters.http.schemas import Check, Health, QueueBucket, QueueOut, WorkflowOut

WATCHER_STALE_S = 90.0


async def workflows(request: Request) -> Response:
    """GET /api/workflows: every workflow, its settings and its task's parameter schema."""
    state = app_state(request)
    items = [
        WorkflowOut(name=name, enabled=wf.config.enabled, concurrency=wf.config.concurrency,
                    timeout_s=wf.config.timeout_s, max_attempts=wf.config.max_attempts,
                    params_schema=msgspec.json.schema(wf.processor.Task),
                    problem=state.workflow_problems.get(name))
        for name, wf in sorted(state.kernel.manager.workflows.items())
    ]
    items += [WorkflowOut(name=name, enabled=False, concurrency=None, timeout_s=None,
                          max_attempts=0, params_schema={}, problem=problem)
              for name, problem in sorted(state.workflow_problems.items())
              if name not in state.kernel.manager.workflows]
    return json_response(items)


async def queue(request: Request) -> Response:
    """GET /api/queue: depth, running jobs, by workflow and by priority."""
    manager = app_state(request).kernel.manager
    buckets: Counter[tuple[str, int]] = Counter()
    for job in manager.queue.jobs():
        buckets[(job.workflow_name, job.priority)] += 1
    by_workflow: Counter[str] = Counter()
    for (workflow_name, _), depth in buckets.items():
        by_workflow[workflow_name] += depth
    running = manager.running_jobs()
    return json_response(QueueOut(
        depth=len(manager.queue), running=len(running),
        running_jobs=[job.id for job in running], by_workflow=dict(by_workflow),
        buckets=[QueueBucket(w, p, d) for (w, p), d in sorted(buckets.items())],
        claiming=manager.claiming, last_seq=await app_state(request).kernel.store.last_seq()))


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text format (needs a token unless metrics_public)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = app_state(request).kernel.metrics
    body = generate_latest(registry.registry) if registry is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def livez(request: Request) -> Response:
    """GET /livez: the process answers."""
    return json_response({"status": "alive"})


async def healthz(request: Request) -> Response:
    """GET /healthz: the readiness checks, always 200 (for humans and dashboards)."""
    return json_response(await _health(request))


async def readyz(request: Request) -> Response:
    """GET /readyz: 200 when every check passes, 503 otherwise (and while draining)."""
    health = await _health(request)
    return json_response(health, 200 if health.status == "ready" else 503)


async def _health(request: Request) -> Health:
    state = app_state(request)
    checks = [Check("accepting", not state.draining and not state.starting,
                    "draining: finishing running jobs" if state.draining else
                    "starting: the watchers are not started yet" if state.starting else "")]
    checks.append(await _store_check(request))
    checks.append(_disk_check(request))
    for name, watcher in sorted(state.kernel.watchers.items()):
        age_s = watcher.heartbeat_age_s()
        checks.append(Check(f"watcher:{name}", age_s < WATCHER_STALE_S,
                            f"heartbeat {age_s:.0f} s ago"))
    if state.scanner_ping is not None:
        reachable = await state.scanner_ping()
        checks.append(Check("scanner", reachable, "" if reachable else "clamd does not answer"))
    for name, problem in sorted(state.workflow_problems.items()):
        checks.append(Check(f"workflow:{name}", False, problem))
    ready = all(check.ok for check in checks)
    return Health(status="ready" if ready else "not ready", checks=checks)


PROBE_EVERY_S = 1.0
PROBE_NAME = "readyz:write-probe"  # the checkpoint row /readyz writes to prove the store writable


async def _store_check(request: Request) -> Check:
    """Writable, proved by a write: a durable commit of a probe row beside the log (the
    SQLite store answers `last_seq` from memory, and a store whose disk refuses writes
    looked ready). At most one probe a second: a flood of probes (the route needs no
    token) gets the last answer instead of an fsync each."""
    state = app_state(request)
    now_s = anyio.current_time()
    last = state.store_probe
    if last is not None and now_s - last[0] < PROBE_EVERY_S:
        cached: Check = last[1]
        return cached
    store = state.kernel.store
    try:
        with anyio.fail_after(2):
            seq = await store.last_seq()
            write = getattr(store, "set_checkpoint", None)
            if write is not None:
                await write(PROBE_NAME, seq)
    except Exception as exc:  # any failure means "not ready", with the reason shown
        check = Check("store", False, f"{type(exc).__name__}: {exc}")
    else:
        check = Check("store", True)
    state.store_probe = (anyio.current_time(), check)
    return check


def _disk_check(request: Request) -> Check:
    state = app_state(request)
    free = shutil.disk_usage(state.kernel.files.data_dir).free
    minimum = state.settings.disk_free_min_bytes
    return Check("disk", free >= minimum, f"{free // (1024 * 1024)} MiB free")
