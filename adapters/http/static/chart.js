// A per-minute bar chart of finished jobs, drawn as SVG by hand (no chart library).

const SVG_NS = "http://www.w3.org/2000/svg";
const MINUTE_MS = 60_000;
const BAR_W = 4;
const STEP_W = 6;
const HEIGHT = 44;

/** Count outcomes per wall-clock minute over the last `minutes`, oldest first. */
export function minuteBuckets(outcomes, nowMs, minutes) {
  const buckets = Array.from({ length: minutes }, (_, i) => ({
    startMs: (Math.floor(nowMs / MINUTE_MS) - (minutes - 1 - i)) * MINUTE_MS,
    done: 0,
    failed: 0,
  }));
  const current = Math.floor(nowMs / MINUTE_MS);
  for (const outcome of outcomes) {
    const age = current - Math.floor(outcome.atMs / MINUTE_MS);
    if (age < 0 || age >= minutes) continue;
    const bucket = buckets[minutes - 1 - age];
    if (outcome.failed) bucket.failed += 1;
    else bucket.done += 1;
  }
  return buckets;
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function clockTime(ms) {
  const date = new Date(ms);
  return `${String(date.getHours()).padStart(2, "0")}:${String(date.getMinutes()).padStart(2, "0")}`;
}

function bar(bucket, x, scale) {
  const group = svg("g", {});
  const title = svg("title", {});
  title.textContent = `${clockTime(bucket.startMs)}: ${bucket.done} completed, ${bucket.failed} failed`;
  group.append(title, svg("rect", { x, y: 0, width: STEP_W, height: HEIGHT, class: "hit" }));
  const doneH = bucket.done * scale;
  const failedH = bucket.failed * scale;
  if (doneH > 0) {
    group.append(svg("rect", { x, y: HEIGHT - doneH, width: BAR_W, height: doneH, class: "bar-done" }));
  }
  if (failedH > 0) {
    const y = HEIGHT - doneH - failedH;
    group.append(svg("rect", { x, y, width: BAR_W, height: failedH, class: "bar-failed" }));
  }
  return group;
}

/** An SVG of `buckets` (completed below, failed stacked on top), scaled to the busiest minute. */
export function throughputChart(buckets) {
  const width = buckets.length * STEP_W;
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${HEIGHT}`,
    preserveAspectRatio: "none",
    class: "chart",
    role: "img",
  });
  const peak = Math.max(1, ...buckets.map((b) => b.done + b.failed));
  const scale = (HEIGHT - 2) / peak;
  chart.append(svg("line", { x1: 0, y1: HEIGHT - 0.5, x2: width, y2: HEIGHT - 0.5, class: "baseline" }));
  buckets.forEach((bucket, i) => {
    if (bucket.done + bucket.failed > 0) chart.append(bar(bucket, i * STEP_W, scale));
  });
  const label = svg("title", {});
  label.textContent = `finished jobs per minute, busiest minute ${peak}`;
  chart.prepend(label);
  return chart;
}
