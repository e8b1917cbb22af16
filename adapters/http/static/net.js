// The dashboard's network layer: JSON requests and Server-Sent Events, both over fetch.
// EventSource cannot send an Authorization header, and the token must never be in a URL,
// so the event stream is read with fetch and parsed here.

/** An answer other than 2xx; `status` 401 means the token was refused. */
export class HttpError extends Error {
  constructor(status, detail, retryAfterS) {
    super(`HTTP ${status}: ${detail}`);
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

/** The server's clock, estimated from the Date header of its answers. */
export const clock = {
  offsetMs: 0,
  now() {
    return Date.now() + this.offsetMs;
  },
  observe(response) {
    const dateMs = Date.parse(response.headers.get("Date") ?? "");
    if (Number.isNaN(dateMs)) return;
    // The header has whole seconds: ignore the noise of a clock that is in fact shared.
    const offsetMs = dateMs + 500 - Date.now();
    this.offsetMs = Math.abs(offsetMs) < 2000 ? 0 : offsetMs;
  },
};

async function httpError(response) {
  let detail = response.statusText;
  try {
    const problem = await response.json();
    if (typeof problem.detail === "string") detail = problem.detail;
  } catch {
    // not a problem document: the status text will do
  }
  const retryAfterS = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  return new HttpError(response.status, detail, Number.isNaN(retryAfterS) ? 0 : retryAfterS);
}

/** GET `path` with the bearer token in a header; the decoded JSON, or an HttpError. */
export async function requestJson(path, token, signal) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  clock.observe(response);
  if (!response.ok) throw await httpError(response);
  return response.json();
}

/** Split the complete lines (ended by CRLF, LF or CR) off `buffer`: [lines, rest]. */
export function splitLines(buffer) {
  const lines = [];
  let start = 0;
  for (let i = 0; i < buffer.length; i += 1) {
    const char = buffer[i];
    if (char !== "\n" && char !== "\r") continue;
    if (char === "\r" && i + 1 === buffer.length) break; // a LF may follow in the next chunk
    lines.push(buffer.slice(start, i));
    if (char === "\r" && buffer[i + 1] === "\n") i += 1;
    start = i + 1;
  }
  return [lines, buffer.slice(start)];
}

/** The SSE wire format, fed text as it arrives; returns the messages it completes. */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.reset();
  }

  reset() {
    this.id = null;
    this.type = "message";
    this.data = [];
  }

  feed(text) {
    const [lines, rest] = splitLines(this.buffer + text);
    this.buffer = rest;
    const messages = [];
    for (const line of lines) {
      const message = this.line(line);
      if (message !== null) messages.push(message);
    }
    return messages;
  }

  line(line) {
    if (line === "") {
      const message = this.data.length ? { id: this.id, type: this.type, data: this.data.join("\n") } : null;
      this.reset();
      return message;
    }
    if (line.startsWith(":")) return null; // a comment: the server's keep-alive ping
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.id = value;
    return null;
  }
}

/**
 * Read one event stream until the server ends it, calling `onMessage` for each message.
 * Throws an HttpError for a refused request, and aborts when nothing (not even a ping)
 * arrives for `idleMs`, so that a silently dead connection is noticed and replaced.
 */
export async function streamEvents({ url, headers, signal, idleMs, onOpen, onMessage }) {
  const local = new AbortController();
  const abort = () => local.abort();
  signal.addEventListener("abort", abort, { once: true });
  let idle = null;
  const arm = () => {
    clearTimeout(idle);
    idle = setTimeout(() => local.abort(), idleMs);
  };
  try {
    arm();
    const response = await fetch(url, {
      headers: { ...headers, Accept: "text/event-stream" },
      signal: local.signal,
      cache: "no-store",
      credentials: "omit",
    });
    clock.observe(response);
    if (!response.ok) throw await httpError(response);
    onOpen();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    for (;;) {
      arm();
      const { value, done } = await reader.read();
      if (done) return;
      for (const message of parser.feed(value)) onMessage(message);
    }
  } finally {
    clearTimeout(idle);
    signal.removeEventListener("abort", abort);
    local.abort(); // release the connection when we leave early
  }
}
