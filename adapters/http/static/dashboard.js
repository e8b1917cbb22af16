// The multiflow dashboard: asks for the token once, loads the state from the API, then
// follows GET /api/events and redraws. The token lives in sessionStorage (this tab only,
// gone when the tab closes) and travels only in the Authorization header.

import { HOUR_MS, RECENT_MAX, applyEvent, jobFromApi, model, putJob, resetModel } from "./model.js";
import { HttpError, clock, requestJson, streamEvents } from "./net.js";
import { render, resetView, setConnection } from "./view.js";

const TOKEN_KEY = "multiflow.token";
const IDLE_MS = 45_000; // the server pings every 15 s: this much silence is a dead link
const BACKOFF_MIN_MS = 1_000;
const BACKOFF_MAX_MS = 15_000;
const QUEUE_REFRESH_MS = 1_000; // at most one GET /api/queue a second while events arrive
const QUEUE_POLL_MS = 15_000;
const HOUR_JOBS_MAX = 1000; // the API's page limit
const HISTORY_FETCHES_MAX = 2; // at once
const UNKNOWN_MAX = 500; // jobs waiting for their history; beyond, events for others are dropped
const $ = (id) => document.getElementById(id);

let session = null; // {token, controller, loaded}
const unknown = new Map(); // job id -> stream events waiting for the job's history
const historyQueue = [];
let historyActive = 0;
let queueTimer = null;
let queueFollowUp = false;
let queueAskedMs = 0;
let renderPending = false;

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function api(current, path) {
  return requestJson(path, current.token, current.controller.signal);
}

function isCurrent(current) {
  return current === session && !current.controller.signal.aborted;
}

// ---- the token -------------------------------------------------------------------------

function askToken(message) {
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
  $("forget").hidden = true;
  $("token").value = "";
  $("token").focus();
}

async function submitToken(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  try {
    await requestJson("/api/queue", token, AbortSignal.timeout(10_000));
  } catch (err) {
    const refused = err instanceof HttpError && err.status === 401;
    askToken(refused ? "The server refused this token." : `The server did not answer (${err.message}).`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  start(token);
}

function signOut(message) {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  $("board").hidden = true;
  setConnection("signed-out", "signed out");
  askToken(message);
}

// ---- the session -----------------------------------------------------------------------

function start(token) {
  stop();
  resetModel();
  resetView();
  const current = { token, controller: new AbortController(), loaded: false };
  session = current;
  $("board").hidden = false;
  $("forget").hidden = false;
  render();
  run(current);
}

function stop() {
  if (session) session.controller.abort();
  session = null;
  unknown.clear();
  historyQueue.length = 0;
  clearTimeout(queueTimer);
  queueTimer = null;
  queueFollowUp = false;
}

/** Load, then follow the stream; after any failure wait (doubling) and resume from lastSeq. */
async function run(current) {
  let delayMs = BACKOFF_MIN_MS;
  while (isCurrent(current)) {
    try {
      if (!current.loaded) await loadInitial(current);
      await follow(current, () => {
        delayMs = BACKOFF_MIN_MS;
      });
    } catch (err) {
      if (!isCurrent(current)) return;
      if (err instanceof HttpError && err.status === 401) {
        signOut("The server refused the token; enter it again.");
        return;
      }
      if (err instanceof HttpError && err.retryAfterS) delayMs = Math.max(delayMs, err.retryAfterS * 1000);
    }
    await countdown(current, delayMs);
    delayMs = Math.min(delayMs * 2, BACKOFF_MAX_MS);
  }
}

async function countdown(current, delayMs) {
  for (let leftMs = delayMs; leftMs > 0 && isCurrent(current); leftMs -= 1000) {
    setConnection("reconnecting", `offline, retrying in ${Math.ceil(leftMs / 1000)} s`);
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000, leftMs)));
  }
}

/** GET the queue, the workflows and the jobs; the stream then starts where they stood. */
async function loadInitial(current) {
  setConnection("connecting", "loading…");
  const queue = await api(current, "/api/queue");
  // The position must be taken before the jobs are read: events after it are replayed.
  const after = Number.isInteger(queue.last_seq) ? queue.last_seq : await newestSeq(current);
  const since = encodeURIComponent(new Date(clock.now() - HOUR_MS).toISOString());
  const [workflows, recent, hour] = await Promise.all([
    api(current, "/api/workflows"),
    api(current, `/api/jobs?limit=${RECENT_MAX}`),
    api(current, `/api/jobs?limit=${HOUR_JOBS_MAX}&created_after=${since}`),
  ]);
  if (!isCurrent(current)) return;
  model.queue = queue;
  model.workflows = workflows;
  model.lastSeq = after;
  for (const out of [...hour.items, ...recent.items]) putJob(jobFromApi(out));
  for (const id of queue.running_jobs) if (!model.jobs.has(id)) needHistory(current, id, []);
  queueAskedMs = Date.now();
  current.loaded = true;
  scheduleRender();
}

/** The last seq of the newest job's events: a position at or before the log's head. */
async function newestSeq(current) {
  const page = await api(current, "/api/jobs?limit=1");
  if (!page.items.length) return 0;
  const events = await api(current, `/api/jobs/${encodeURIComponent(page.items[0].id)}/events`);
  return events.reduce((top, event) => Math.max(top, event.seq), 0);
}

function follow(current, onOpen) {
  const headers = { Authorization: `Bearer ${current.token}` };
  if (model.lastSeq > 0) headers["Last-Event-ID"] = String(model.lastSeq);
  setConnection("connecting", "connecting…");
  return streamEvents({
    url: `/api/events?after=${model.lastSeq}`,
    headers,
    signal: current.controller.signal,
    idleMs: IDLE_MS,
    onOpen: () => {
      onOpen();
      setConnection("live", "live");
      refreshQueueSoon(current);
    },
    onMessage: (message) => take(current, message),
  });
}

function take(current, message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return; // not one of ours: skip it rather than reconnect to the same place for ever
  }
  if (!Number.isInteger(event.seq) || event.seq <= model.lastSeq) return;
  model.lastSeq = event.seq;
  if (!applyEvent(event)) needHistory(current, event.job_id, [event]);
  if (event.type !== "job.progress") refreshQueueSoon(current);
  scheduleRender();
}

// ---- jobs we have not seen: fetch their history, then apply what the stream brought ----

function needHistory(current, jobId, events) {
  const waiting = unknown.get(jobId);
  if (waiting) {
    waiting.push(...events);
    return;
  }
  if (unknown.size >= UNKNOWN_MAX) return;
  unknown.set(jobId, [...events]);
  historyQueue.push(jobId);
  pumpHistory(current);
}

function pumpHistory(current) {
  while (historyActive < HISTORY_FETCHES_MAX && historyQueue.length && isCurrent(current)) {
    const jobId = historyQueue.shift();
    historyActive += 1;
    loadHistory(current, jobId).finally(() => {
      historyActive -= 1;
      pumpHistory(current);
    });
  }
}

async function loadHistory(current, jobId) {
  let history = [];
  try {
    history = await api(current, `/api/jobs/${encodeURIComponent(jobId)}/events`);
  } catch (err) {
    if (isCurrent(current) && err instanceof HttpError && err.status === 401) {
      signOut("The server refused the token; enter it again.");
    }
  }
  if (!isCurrent(current)) return;
  const waiting = unknown.get(jobId) ?? [];
  unknown.delete(jobId);
  for (const event of [...history, ...waiting]) applyEvent(event);
  scheduleRender();
}

// ---- the queue's figures ---------------------------------------------------------------

/** Ask for the queue soon, and once more a second later: it may lag the events it follows. */
function refreshQueueSoon(current) {
  queueFollowUp = true;
  armQueueTimer(current);
}

/** Ask now, or a second after the last ask; a pending ask covers everything before it. */
function armQueueTimer(current) {
  if (queueTimer !== null) return;
  const waitMs = Math.max(0, queueAskedMs + QUEUE_REFRESH_MS - Date.now());
  queueTimer = setTimeout(() => {
    queueTimer = null;
    const followUp = queueFollowUp;
    queueFollowUp = false;
    refreshQueue(current);
    if (followUp) armQueueTimer(current);
  }, waitMs);
}

async function refreshQueue(current) {
  const askedMs = Date.now();
  queueAskedMs = askedMs;
  try {
    const queue = await api(current, "/api/queue");
    if (!isCurrent(current) || askedMs !== queueAskedMs) return; // a newer answer is coming
    model.queue = queue;
    for (const id of queue.running_jobs) if (!model.jobs.has(id)) needHistory(current, id, []);
    scheduleRender();
  } catch (err) {
    if (isCurrent(current) && err instanceof HttpError && err.status === 401) {
      signOut("The server refused the token; enter it again.");
    }
  }
}

function tick() {
  if (!session?.loaded) return;
  if (Date.now() - queueAskedMs > QUEUE_POLL_MS) armQueueTimer(session);
  scheduleRender(); // elapsed times and the charts' minutes move on
}

function boot() {
  $("login-form").addEventListener("submit", submitToken);
  $("forget").addEventListener("click", () => signOut(""));
  setInterval(tick, 1000);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) start(token);
  else askToken("");
}

boot();
