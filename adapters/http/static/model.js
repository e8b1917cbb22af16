// What the dashboard knows: jobs folded from the API's job list and the event stream,
// and the finished jobs of the last hour. Mirrors the kernel's `evolve` for the fields shown.

import { clock } from "./net.js";

export const HOUR_MS = 3_600_000;
export const RECENT_MAX = 50;
const JOBS_MAX = 5000; // jobs kept in memory; the oldest finished ones go first

export const model = {
  jobs: new Map(), // id -> job
  outcomes: new Map(), // "id|status|ms" -> {workflow, failed, atMs}: final outcomes only
  queue: null, // GET /api/queue
  workflows: [], // GET /api/workflows
  lastSeq: 0, // the last event taken from the stream
  revision: 0, // bumped on every change
  outcomesRevision: 0, // bumped when an outcome is added or dropped, so charts redraw only then
};

/** Forget everything (a new token, a new session). */
export function resetModel() {
  model.jobs.clear();
  model.outcomes.clear();
  model.queue = null;
  model.workflows = [];
  model.lastSeq = 0;
  model.revision += 1;
}

/** A job from the API (JobOut); its version is unknown unless the API sends it. */
export function jobFromApi(out) {
  return {
    id: out.id,
    workflow_name: out.workflow_name,
    file_path: out.file_path,
    status: out.status,
    attempts: out.attempts,
    progress: out.progress,
    progress_message: out.progress_message,
    created_at: out.created_at,
    started_at: out.started_at,
    finished_at: out.finished_at,
    retry_at: out.retry_at,
    error: out.error,
    duplicates: out.duplicates ?? 0,
    version: Number.isInteger(out.version) ? out.version : null,
    updated_ms: Date.parse(out.finished_at ?? out.started_at ?? out.created_at),
  };
}

function createdJob(event) {
  const data = event.data;
  return jobFromApi({
    id: event.job_id, workflow_name: data.workflow_name, file_path: data.file_path,
    status: "pending", attempts: 0, progress: 0, progress_message: "",
    created_at: event.at, started_at: null, finished_at: null, retry_at: null, error: null,
  });
}

const STEPS = {
  "job.started": (job, data, at) => Object.assign(job, {
    status: "running", attempts: data.attempt, started_at: at, retry_at: null,
    progress: 0, progress_message: "",
  }),
  "job.progress": (job, data) => Object.assign(job, {
    progress: data.fraction, progress_message: data.message ?? "",
  }),
  "job.failed": (job, data, at) => {
    job.error = { type: data.error_type, message: data.message };
    if (data.retry_at == null) Object.assign(job, { status: "failed", retry_at: null, finished_at: at });
    else Object.assign(job, { status: "pending", retry_at: data.retry_at });
  },
  "job.completed": (job, data, at) => Object.assign(job, {
    status: "completed", progress: 1, finished_at: at, error: null,
  }),
  "job.cancelled": (job, data, at) => Object.assign(job, {
    status: "cancelled", finished_at: at, retry_at: null,
    error: { type: "Cancelled", message: data.reason || `by ${data.actor}` },
  }),
  "job.retried": (job) => Object.assign(job, {
    status: "pending", finished_at: null, retry_at: null, progress: 0, progress_message: "",
  }),
  "job.duplicate_received": (job) => {
    job.duplicates += 1;
  },
};

/**
 * Apply one stored event. Returns false when the job is unknown here (its history must be
 * fetched first); events a job already reflects (by version) are skipped.
 */
export function applyEvent(event) {
  let job = model.jobs.get(event.job_id);
  if (job && job.version !== null && event.version <= job.version) return true;
  if (event.type === "job.created") {
    job = createdJob(event);
    model.jobs.set(job.id, job);
  } else if (!job) {
    return false;
  } else {
    STEPS[event.type]?.(job, event.data ?? {}, event.at);
  }
  job.version = event.version;
  job.updated_ms = Date.parse(event.at);
  noteOutcome(job);
  model.revision += 1;
  return true;
}

/** Add a job (from the API) and count its outcome. */
export function putJob(job) {
  model.jobs.set(job.id, job);
  noteOutcome(job);
  model.revision += 1;
}

/** Count a finished job once: the key holds its finish time, so a replay cannot double it. */
function noteOutcome(job) {
  if ((job.status !== "completed" && job.status !== "failed") || !job.finished_at) return;
  const atMs = Date.parse(job.finished_at);
  if (clock.now() - atMs > HOUR_MS) return;
  const key = `${job.id}|${job.status}|${atMs}`;
  if (model.outcomes.has(key)) return;
  model.outcomes.set(key, { workflow: job.workflow_name, failed: job.status === "failed", atMs });
  model.outcomesRevision += 1;
}

/** Drop outcomes older than the hour and jobs beyond the memory bound. */
export function prune(nowMs) {
  for (const [key, outcome] of model.outcomes) {
    if (nowMs - outcome.atMs <= HOUR_MS) continue;
    model.outcomes.delete(key);
    model.outcomesRevision += 1;
  }
  if (model.jobs.size <= JOBS_MAX) return;
  const keep = new Set(recentJobs(RECENT_MAX).map((job) => job.id));
  const finished = [...model.jobs.values()]
    .filter((job) => job.status !== "running" && !keep.has(job.id))
    .sort(byActivity)
    .reverse();
  for (const job of finished.slice(0, model.jobs.size - JOBS_MAX)) model.jobs.delete(job.id);
}

function byActivity(a, b) {
  if (a.updated_ms !== b.updated_ms) return b.updated_ms - a.updated_ms;
  return a.id < b.id ? 1 : -1;
}

/** The `limit` jobs that changed last, newest first. */
export function recentJobs(limit) {
  return [...model.jobs.values()].sort(byActivity).slice(0, limit);
}

/** The running jobs, the longest running first. */
export function runningJobs() {
  return [...model.jobs.values()]
    .filter((job) => job.status === "running")
    .sort((a, b) => Date.parse(a.started_at) - Date.parse(b.started_at));
}

/** Every workflow name the server listed or the jobs mention, sorted. */
export function workflowNames() {
  const names = new Set(model.workflows.map((w) => w.name));
  for (const outcome of model.outcomes.values()) names.add(outcome.workflow);
  for (const job of model.jobs.values()) if (job.status === "running") names.add(job.workflow_name);
  return [...names].sort();
}
