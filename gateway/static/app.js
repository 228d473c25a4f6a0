// The page: the key, the prompt form, what a submission came to, and the gallery of the
// key's recent jobs, each running one followed live over its event stream.

import { ApiError, call, currentKey, forgetKey, keyId, saveKey } from "./api.js";
import { follow } from "./events.js";
import { ended, jobCard, shortPrompt } from "./jobs.js";

// A browser opens about six HTTP/1.1 connections per origin: streams beyond a few would
// leave none for submitting. Jobs past the limit wait their turn for a stream.
const MAX_STREAMS = 3;
const PAGE_SIZE = 24;

const $ = (id) => document.getElementById(id);
const cards = new Map(); // job id -> card
const streaming = new Map(); // job id -> AbortController
const waiting = []; // job ids waiting for a stream
let session = new AbortController(); // aborted when the key changes: its streams stop
let nextCursor = null; // where the next older page begins
let olderShown = false;

// ---- notices ---------------------------------------------------------------------------

function notify(kind, text, details = []) {
  const notice = $("notice");
  notice.className = `notice ${kind}`;
  notice.replaceChildren(text);
  if (details.length) {
    const list = document.createElement("ul");
    for (const detail of details) {
      const item = document.createElement("li");
      item.textContent = detail;
      list.append(item);
    }
    notice.append(list);
  }
  notice.hidden = false;
}

function announce(text) {
  $("announcer").textContent = text;
}

function clock(ms) {
  return new Date(Date.now() + ms).toLocaleTimeString();
}

// What a refused call means to the user: when to retry, or why it was refused.
function explain(error) {
  const { problem } = error;
  const detail = problem.detail ? ` ${problem.detail}` : "";
  if (error.retryAfterMs !== null && error.retryAfterMs !== undefined) {
    const seconds = Math.max(1, Math.ceil(error.retryAfterMs / 1000));
    const what = error.status === 429 ? "Rate limit reached" : problem.title;
    notify("wait", `${what}: try again in ${seconds} s (at ${clock(error.retryAfterMs)}).${detail}`);
  } else if (error.status === 401) {
    notify("error", `The key was refused:${detail} Paste a valid key above.`);
    $("api-key").focus();
  } else if (error.slug === "invalid-request" && Array.isArray(problem.errors)) {
    const fields = problem.errors.map((e) => `${e.loc.filter((p) => p !== "body").join(".")}: ${e.msg}`);
    notify("error", `The request is invalid:`, fields);
  } else if (error.status === 0) {
    notify("error", `${problem.title}.${detail}`);
  } else {
    notify("error", `Rejected (${problem.title || error.status}):${detail}`);
  }
}

// ---- the key ---------------------------------------------------------------------------

function showKey() {
  const key = currentKey();
  const id = keyId(key);
  $("key-state").textContent = key
    ? `Using key ${id ?? "(unrecognised form)"} for this tab.`
    : "No key yet: paste one to begin.";
}

function reset() {
  session.abort();
  session = new AbortController();
  streaming.clear();
  waiting.length = 0;
  cards.clear();
  $("jobs").replaceChildren();
  $("older").hidden = true;
  nextCursor = null;
  olderShown = false;
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  saveKey(key);
  $("api-key").value = "";
  reset();
  showKey();
  await loadJobs();
});

$("forget-key").addEventListener("click", () => {
  forgetKey();
  reset();
  showKey();
  $("jobs-state").textContent = "Paste a key to see its jobs.";
  $("notice").hidden = true;
});

// ---- submitting ------------------------------------------------------------------------

function requestBody(form) {
  const fields = new FormData(form);
  const number = (name) => Number(fields.get(name));
  const body = {
    prompt: fields.get("prompt"),
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    priority: fields.get("priority"),
    output_format: fields.get("output_format"),
    guidance_scale: number("guidance_scale"),
  };
  // Blank means "the gateway's default": left out, not sent empty.
  if (fields.get("seed") !== "") body.seed = number("seed");
  for (const name of ["negative_prompt", "model"]) {
    const value = String(fields.get(name)).trim();
    if (value) body[name] = value;
  }
  return body;
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!currentKey()) {
    notify("error", "Paste an API key first.");
    $("api-key").focus();
    return;
  }
  const button = $("submit");
  button.disabled = true;
  $("generate-form").setAttribute("aria-busy", "true");
  notify("", "Submitting…");
  try {
    const job = await call("POST", "/v1/images/generations", {
      body: requestBody(event.target),
      signal: session.signal,
    });
    show(job, { first: true });
    notify("", `Job ${job.status}: ${shortPrompt(job)}`);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    explain(error);
    if (error.problem.job) show(error.problem.job, { first: true }); // a refusal is a job too
  } finally {
    button.disabled = false;
    $("generate-form").removeAttribute("aria-busy");
  }
});

// ---- the gallery -----------------------------------------------------------------------

// Adds the job's card, or updates it, and follows the job if it still runs.
function show(job, { first = false } = {}) {
  let card = cards.get(job.id);
  const before = card?.job.status;
  if (card) {
    card.update(job);
  } else {
    card = jobCard(job, { onCancel: cancel, onImageError: refetch });
    cards.set(job.id, card);
    if (first) $("jobs").prepend(card.node);
    else $("jobs").append(card.node);
  }
  if (before && before !== job.status) announce(`${shortPrompt(job)}: ${job.status}`);
  $("jobs-state").textContent = `${cards.size} recent job${cards.size === 1 ? "" : "s"}.`;
  if (!ended(job)) watch(job.id);
}

function watch(jobId) {
  if (streaming.has(jobId) || waiting.includes(jobId)) return;
  if (streaming.size >= MAX_STREAMS) {
    waiting.push(jobId);
    return;
  }
  const controller = new AbortController();
  session.signal.addEventListener("abort", () => controller.abort(), { once: true });
  streaming.set(jobId, controller);
  const mine = session;
  follow(
    jobId,
    (event) => {
      if (event.event === "progress") cards.get(jobId)?.progress(event.data.step, event.data.steps);
      else if (event.data && typeof event.data === "object") show(event.data);
    },
    controller.signal,
  )
    .catch((error) => {
      if (error instanceof ApiError) announce(`Lost the events of a job: ${error.message}`);
    })
    .finally(() => {
      if (mine !== session) return; // the key changed: the queue is another one now
      streaming.delete(jobId);
      const next = waiting.shift();
      if (next) watch(next);
    });
}

async function loadJobs({ older = false } = {}) {
  if (!currentKey()) return;
  $("jobs-state").textContent = "Loading…";
  const cursor = older && nextCursor ? `&cursor=${encodeURIComponent(nextCursor)}` : "";
  try {
    const page = await call("GET", `/v1/images/jobs?limit=${PAGE_SIZE}${cursor}`, {
      signal: session.signal,
    });
    if (older) {
      for (const job of page.data) show(job);
      nextCursor = page.next_cursor;
      olderShown = true;
    } else {
      // Newest first, in the list's order, ahead of any older pages already shown.
      for (const job of [...page.data].reverse()) show(job, { first: true });
      if (!olderShown) nextCursor = page.next_cursor; // else: where the older pages ended
    }
    $("older").hidden = nextCursor === null;
    if (cards.size === 0) $("jobs-state").textContent = "No jobs yet.";
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    $("jobs-state").textContent = "The jobs could not be listed.";
    explain(error);
  }
}

async function cancel(job, failed) {
  try {
    const answered = await call("POST", `/v1/images/jobs/${encodeURIComponent(job.id)}/cancel`, {
      signal: session.signal,
    });
    announce(`Cancel requested: ${shortPrompt(answered)}`);
    // Its stream tells the end; one still waiting for a stream goes first.
    const index = waiting.indexOf(job.id);
    if (index > 0) waiting.unshift(...waiting.splice(index, 1));
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.problem.job) show(error.problem.job); // job-ended: it ended meanwhile
    else {
      failed();
      explain(error);
    }
  }
}

// An image that does not load has most likely an expired presigned URL: the job read
// again carries a fresh one (once per card: a broken store would loop otherwise).
const refetched = new Set();
async function refetch(job) {
  if (refetched.has(job.id)) return;
  refetched.add(job.id);
  try {
    show(await call("GET", `/v1/images/jobs/${encodeURIComponent(job.id)}`));
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
  }
}

$("refresh").addEventListener("click", () => loadJobs());
$("older").addEventListener("click", () => loadJobs({ older: true }));

showKey();
loadJobs();
