// A job's server-sent events, read with fetch() and a stream reader: EventSource cannot send
// an Authorization header, and the key must not go in the URL (URLs end up in logs).
// The lines are parsed here as the SSE standard says (id:, event:, data:, comments).

import { ApiError, authHeaders, parsed, problemOf } from "./api.js";

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 10000;

// Calls onEvent({id, event, data}) for each event of the job until `completed` (resolves
// true) or until `signal` aborts (resolves false). A stream that breaks off is opened again
// with Last-Event-ID, so the gateway sends only what came after the last event seen; an
// answer that reconnecting cannot mend (401, 404) rejects with its ApiError.
export async function follow(jobId, onEvent, signal) {
  let lastEventId = null;
  let delay = FIRST_DELAY_MS;
  while (!signal.aborted) {
    try {
      const completed = await stream(
        jobId,
        lastEventId,
        (event) => {
          if (event.id !== null) lastEventId = event.id;
          delay = FIRST_DELAY_MS; // events flow again: the next break starts the backoff anew
          onEvent(event);
        },
        signal,
      );
      if (completed) return true;
    } catch (error) {
      if (signal.aborted) return false;
      const lasting = error instanceof ApiError && [401, 403, 404, 422].includes(error.status);
      if (lasting) throw error;
    }
    await pause(delay, signal); // a gateway that restarts or an outage: do not spin on it
    delay = Math.min(delay * 2, MAX_DELAY_MS);
  }
  return false;
}

async function stream(jobId, lastEventId, onEvent, signal) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
  const response = await fetch(`/v1/images/jobs/${encodeURIComponent(jobId)}/events`, {
    headers,
    signal,
    cache: "no-store",
  });
  if (!response.ok) throw problemOf(response, await parsed(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventParser();
  let rest = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false; // ended before `completed`: the caller reconnects
      rest += value;
      const lines = rest.split("\n");
      rest = lines.pop(); // a line is whole only once its newline came
      for (const line of lines) {
        const event = parser.feed(line.endsWith("\r") ? line.slice(0, -1) : line);
        if (event === null) continue;
        onEvent(event);
        if (event.event === "completed") return true;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // closes the connection: a browser holds only a few
  }
}

// Line by line: feed() returns the event a blank line completes, else null.
export class EventParser {
  constructor() {
    this.id = null;
    this.reset();
  }

  reset() {
    this.event = "message";
    this.data = [];
    this.hasData = false;
  }

  feed(line) {
    if (line === "") {
      if (!this.hasData) {
        this.reset();
        return null;
      }
      const text = this.data.join("\n");
      let data = text;
      try {
        data = JSON.parse(text);
      } catch {
        // not JSON: kept as text
      }
      const event = { id: this.id, event: this.event, data };
      this.reset();
      return event;
    }
    if (line.startsWith(":")) return null; // a comment: `: keep-alive`
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") {
      this.data.push(value);
      this.hasData = true;
    } else if (field === "id" && !value.includes("\0")) this.id = value;
    return null;
  }
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}
