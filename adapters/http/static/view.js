// Drawing the model into the page. Text from the server only ever goes into textContent
// or attributes set one by one: never into innerHTML.

import { minuteBuckets, throughputChart } from "./chart.js";
import { RECENT_MAX, model, prune, recentJobs, runningJobs, workflowNames } from "./model.js";
import { clock } from "./net.js";

const MINUTES = 60;
const $ = (id) => document.getElementById(id);
const runningItems = new Map(); // job id -> its <li> and the parts that change
const recentRows = new Map(); // job id -> its <tr> and cells
let chartsKey = "";

/** An element with attributes and children (strings become text nodes). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  node.append(...children);
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function baseName(path) {
  return path.slice(path.lastIndexOf("/") + 1);
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function clockTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${pad(Math.floor(s / 60) % 60)} min`;
}

function percent(fraction) {
  return `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)}%`;
}

function errorText(error) {
  return error ? `${error.type}: ${error.message}` : "";
}

/** Redraw everything that changed. */
export function render() {
  const nowMs = clock.now();
  prune(nowMs);
  renderTiles();
  renderRunning(nowMs);
  renderRecent();
  renderWorkflows(nowMs);
}

function hourTotals(workflow) {
  let done = 0;
  let failed = 0;
  for (const outcome of model.outcomes.values()) {
    if (workflow !== undefined && outcome.workflow !== workflow) continue;
    if (outcome.failed) failed += 1;
    else done += 1;
  }
  const rate = done + failed ? `${((100 * failed) / (done + failed)).toFixed(1)}%` : "–";
  return { done, failed, rate };
}

function renderTiles() {
  const queue = model.queue;
  setText($("queue-depth"), queue ? String(queue.depth) : "–");
  setText($("running-count"), queue ? String(queue.running) : "–");
  const totals = hourTotals();
  setText($("done-hour"), String(totals.done));
  setText($("failed-hour"), String(totals.failed));
  setText($("error-rate"), totals.rate);
}

function runningItem(job) {
  const parts = {
    file: el("span", { class: "file" }),
    workflow: el("span", { class: "tag" }),
    pct: el("span", { class: "pct" }),
    fill: el("div", { class: "fill" }),
    message: el("span", { class: "message" }),
    elapsed: el("span", { class: "elapsed" }),
  };
  const track = el("div", { class: "track", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 }, parts.fill);
  parts.track = track;
  parts.li = el("li", { class: "running-job", "data-job-id": job.id },
    el("div", { class: "line" }, parts.file, parts.workflow, parts.pct),
    track,
    el("div", { class: "line meta" }, parts.message, parts.elapsed));
  return parts;
}

function renderRunning(nowMs) {
  const jobs = runningJobs();
  const seen = new Set();
  for (const job of jobs) {
    seen.add(job.id);
    if (!runningItems.has(job.id)) runningItems.set(job.id, runningItem(job));
    const item = runningItems.get(job.id);
    setText(item.file, baseName(job.file_path));
    item.file.title = job.file_path;
    setText(item.workflow, job.workflow_name);
    setText(item.pct, percent(job.progress));
    item.fill.style.width = percent(job.progress); // CSSOM, which the page's CSP allows
    item.track.setAttribute("aria-valuenow", String(Math.round(job.progress * 100)));
    setText(item.message, job.progress_message || `attempt ${job.attempts}`);
    setText(item.elapsed, `running ${duration(nowMs - Date.parse(job.started_at))}`);
  }
  for (const id of [...runningItems.keys()]) if (!seen.has(id)) runningItems.delete(id);
  $("running").replaceChildren(...jobs.map((job) => runningItems.get(job.id).li));
  $("running-empty").hidden = jobs.length > 0;
}

function recentRow(job) {
  const cells = {
    id: el("code"),
    workflow: el("td"),
    file: el("td", { class: "file" }),
    status: el("span", { class: "status" }),
    attempts: el("td", { class: "num" }),
    error: el("td", { class: "error" }),
    when: el("td", { class: "when" }),
  };
  cells.tr = el("tr", { "data-job-id": job.id },
    el("td", { class: "id" }, cells.id), cells.workflow, cells.file,
    el("td", {}, cells.status), cells.attempts, cells.error, cells.when);
  return cells;
}

function statusLabel(job) {
  if (job.status === "pending" && job.retry_at) return `retry at ${clockTime(job.retry_at)}`;
  return job.status;
}

function renderRecent() {
  const jobs = recentJobs(RECENT_MAX);
  const seen = new Set();
  for (const job of jobs) {
    seen.add(job.id);
    if (!recentRows.has(job.id)) recentRows.set(job.id, recentRow(job));
    const row = recentRows.get(job.id);
    setText(row.id, job.id);
    setText(row.workflow, job.workflow_name);
    setText(row.file, baseName(job.file_path));
    row.file.title = job.file_path;
    setText(row.status, statusLabel(job));
    row.status.dataset.status = job.status;
    row.tr.dataset.status = job.status;
    setText(row.attempts, String(job.attempts));
    setText(row.error, errorText(job.error));
    row.error.title = errorText(job.error);
    setText(row.when, clockTime(job.finished_at ?? job.started_at ?? job.created_at));
  }
  for (const id of [...recentRows.keys()]) if (!seen.has(id)) recentRows.delete(id);
  $("jobs").replaceChildren(...jobs.map((job) => recentRows.get(job.id).tr));
  $("jobs-empty").hidden = jobs.length > 0;
}

function workflowHead(name) {
  const info = model.workflows.find((w) => w.name === name);
  const queued = model.queue?.by_workflow?.[name] ?? 0;
  const notes = [`${queued} queued`];
  if (info && !info.enabled) notes.push("disabled");
  if (info?.problem) notes.push(info.problem);
  return el("div", { class: "workflow-head" },
    el("span", { class: "workflow-name" }, name),
    el("span", { class: `workflow-notes${info?.problem ? " bad" : ""}` }, notes.join(" · ")));
}

function workflowRow(name, nowMs) {
  const outcomes = [...model.outcomes.values()].filter((o) => o.workflow === name);
  const row = el("div", { class: "workflow", "data-workflow": name }, workflowHead(name));
  if (!outcomes.length) {
    row.append(el("div", { class: "workflow-stats" }, "no job finished in the last hour"));
    return row;
  }
  const totals = hourTotals(name);
  row.append(
    el("div", { class: "workflow-stats" },
      el("span", {}, el("b", {}, String(totals.done)), " completed"),
      el("span", {}, el("b", { class: totals.failed ? "bad" : "" }, String(totals.failed)), " failed"),
      el("span", {}, el("b", {}, totals.rate), " error rate")),
    el("div", { class: "chart-box" },
      throughputChart(minuteBuckets(outcomes, nowMs, MINUTES)),
      el("div", { class: "axis" }, el("span", {}, "−60 min"), el("span", {}, "now"))));
  return row;
}

function renderWorkflows(nowMs) {
  const names = workflowNames();
  const key = [Math.floor(nowMs / 60_000), model.outcomesRevision, JSON.stringify(model.queue?.by_workflow ?? {}),
    names.join(","), model.workflows.length].join("|");
  if (key === chartsKey) return;
  chartsKey = key;
  $("workflows").replaceChildren(...names.map((name) => workflowRow(name, nowMs)));
  $("workflows-empty").hidden = names.length > 0;
}

/** Show the connection's state: `kind` picks the colour, `text` says it. */
export function setConnection(kind, text) {
  $("connection").dataset.state = kind;
  setText($("connection-text"), text);
}

/** Forget the drawn rows (a new session starts from nothing). */
export function resetView() {
  runningItems.clear();
  recentRows.clear();
  chartsKey = "";
}
