"""GET /api/jobs/{job_id}/explain: why a job is not done yet, as the running server sees it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from adapters.http.errors import ApiError
from adapters.http.jobs import app_state, json_response
from adapters.http.schemas import JobOut
from adapters.http.state import AppState
from kernel import layout
from kernel.state import Job, Status

AHEAD_SHOWN_MAX = 20


class QueuedJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job that runs before the one explained."""

    id: str
    workflow_name: str
    priority: int
    effective_priority: int  # with aging


class FileWhere(msgspec.Struct, frozen=True, kw_only=True):
    """Where the job's file should be, and where it was found (paths under the data root)."""

    expected: str
    found_at: str | None  # None: in none of the places the lifecycle could have left it


class LastEvent(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    type: str
    at: datetime
    age_s: float


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    """The job, one sentence on where it stands, and the facts behind it."""

    job: JobOut
    summary: str
    reasons: list[str]
    queue_position: int | None  # 1-based, in the order the queue would run now
    queue_depth: int
    ahead_count: int  # jobs that start before it (those of enabled workflows)
    ahead: list[QueuedJob]  # the first AHEAD_SHOWN_MAX of them
    retry_in_s: float | None
    running_for_s: float | None
    timeout_s: float | None
    file: FileWhere
    last_event: LastEvent | None


async def explain(request: Request) -> Response:
    """GET /api/jobs/{job_id}/explain: status, queue place, retry time, file, last event."""
    state = app_state(request)
    job_id = request.path_params["job_id"]
    job = await state.kernel.get_job(job_id)
    if job is None:
        raise ApiError(404, f"job {job_id} does not exist")
    now = state.kernel.manager.clock.now()
    events = await state.kernel.job_events(job_id)
    last = events[-1] if events else None
    found_at = await anyio.to_thread.run_sync(_find_file, state, job)
    summary, reasons = _reasons(state, job, now)
    position, ahead = _queue_place(state, job, now)
    workflow = state.kernel.manager.workflows.get(job.workflow_name)
    timeout_s = workflow.config.timeout_s if workflow else None
    return json_response(Explanation(
        job=JobOut.of(job), summary=summary, reasons=reasons, queue_position=position,
        queue_depth=len(state.kernel.manager.queue), ahead_count=len(ahead),
        ahead=ahead[:AHEAD_SHOWN_MAX],
        retry_in_s=(job.retry_at - now).total_seconds() if job.retry_at else None,
        running_for_s=(now - job.started_at).total_seconds()
        if job.status is Status.RUNNING and job.started_at else None,
        timeout_s=timeout_s, file=FileWhere(expected=job.current_path, found_at=found_at),
        last_event=None if last is None else LastEvent(
            seq=last.seq, type=str(last.event.__struct_config__.tag), at=last.event.at,
            age_s=(now - last.event.at).total_seconds())))


def _queue_place(state: AppState, job: Job, now: datetime) -> tuple[int | None, list[QueuedJob]]:
    """The job's 1-based place in the queue's order now, and the jobs that start before it.

    A job waiting for its retry time has no place yet; jobs of disabled or unregistered
    workflows are passed over by the scheduler, so they do not count as before it.
    """
    queue, workflows = state.kernel.manager.queue, state.kernel.manager.workflows
    if job.id not in queue or (job.retry_at is not None and job.retry_at > now):
        return None, []
    order = queue.ordered(now)
    index = next(i for i, queued in enumerate(order) if queued.id == job.id)
    return index + 1, [
        QueuedJob(id=q.id, workflow_name=q.workflow_name, priority=q.priority,
                  effective_priority=queue.effective_priority(q, now))
        for q in order[:index]
        if (wf := workflows.get(q.workflow_name)) is not None and wf.config.enabled]


def _reasons(state: AppState, job: Job, now: datetime) -> tuple[str, list[str]]:
    """One sentence on where the job stands, and what holds it there."""
    if job.status is Status.RUNNING:
        return f"running (attempt {job.attempts}, {job.progress:.0%} done)", []
    if job.status is Status.COMPLETED:
        return f"done: completed at {job.finished_at:%Y-%m-%d %H:%M:%S} UTC", []
    if job.status is not Status.PENDING:
        error = job.error
        why = f"{error.type}: {error.message}" if error else "no error recorded"
        by = f" by {error.actor}" if error and error.actor else ""
        return f"{job.status}{by} ({why})", [
            "it will not run again unless retried: `multiflow retry " + job.id + "`"]
    return "pending", _pending_reasons(state, job, now)


def _pending_reasons(state: AppState, job: Job, now: datetime) -> list[str]:
    manager = state.kernel.manager
    workflow = manager.workflows.get(job.workflow_name)
    reasons = []
    if workflow is None:
        problem = state.workflow_problems.get(job.workflow_name)
        reasons.append(f"the workflow {job.workflow_name} is not registered on this server"
                       + (f": {problem}" if problem else ""))
    elif not workflow.config.enabled:
        reasons.append(f"the workflow {job.workflow_name} is disabled: its jobs wait")
    if job.retry_at is not None and job.retry_at > now:
        error = f" after {job.error.type}: {job.error.message}" if job.error else ""
        reasons.append(f"attempt {job.attempts} failed{error}; the next one is due at "
                       f"{job.retry_at:%Y-%m-%d %H:%M:%S} UTC")
    if job.id not in manager.queue and workflow is not None and job.attempts == 0:
        reasons.append("its file is in the intake checks (size, type, virus scan); "
                       "while the scanner is down, jobs wait here")
    reasons += _capacity_reasons(state, job)
    if not manager.claiming:
        reasons.append("the server is shutting down: no job starts")
    return reasons


def _capacity_reasons(state: AppState, job: Job) -> list[str]:
    manager = state.kernel.manager
    running = manager.running_jobs()
    if len(running) >= manager.concurrency:
        return [f"every slot is busy: {len(running)} of {manager.concurrency} running"]
    workflow = manager.workflows.get(job.workflow_name)
    limit = workflow.config.concurrency if workflow else None
    mine = sum(1 for r in running if r.workflow_name == job.workflow_name)
    if limit is not None and mine >= limit:
        return [f"{job.workflow_name} runs {mine} job(s), its concurrency limit"]
    return []


def _find_file(state: AppState, job: Job) -> str | None:
    """The first place, most likely first, where the job's file lies now."""
    places = [job.current_path, layout.processing_path(job), job.file_path,
              layout.error_path(job)]
    if job.finished_at is not None:
        places.insert(1, layout.archive_path(job, job.finished_at))
    root = Path(state.kernel.files.data_dir)
    for place in places:
        if (root / place).is_file():
            return place
    return None

