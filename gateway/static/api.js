// The gateway's HTTP API as the page uses it: the key from the tab's session storage as a
// bearer token, and every error as the RFC 9457 problem the gateway answers (ApiError).

const KEY_ITEM = "imagegen.apiKey";
const PROBLEM_PREFIX = "urn:imagegen:problem:";

// Session storage, not local storage: the key goes when the tab does, and other tabs of
// the same origin never see it. Where storage is disabled the key lives in memory only.
let memoryKey = null;

export function currentKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM) ?? memoryKey;
  } catch {
    return memoryKey;
  }
}

export function saveKey(key) {
  memoryKey = key;
  try {
    sessionStorage.setItem(KEY_ITEM, key);
  } catch {
    // kept in memory: the page works until it is reloaded
  }
}

export function forgetKey() {
  memoryKey = null;
  try {
    sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // nothing was stored
  }
}

// The public half of a key (`igk_<key_id>_<secret>`): what the page may show of it.
export function keyId(key) {
  const match = /^igk_([a-z0-9]+)_/.exec(key ?? "");
  return match ? match[1] : null;
}

export class ApiError extends Error {
  constructor(status, problem, retryAfterMs) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status; // 0: no answer at all
    this.problem = problem;
    this.retryAfterMs = retryAfterMs;
  }

  // `rate-limited`, `unauthorized`, …: what the page branches on, never the detail.
  get slug() {
    const type = this.problem.type ?? "";
    return type.startsWith(PROBLEM_PREFIX) ? type.slice(PROBLEM_PREFIX.length) : "";
  }
}

export function authHeaders(extra = {}) {
  const key = currentKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

// One API call: the parsed JSON of a 2xx answer, else an ApiError.
export async function call(method, path, { body, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { title: "The gateway cannot be reached", detail: String(error) }, null);
  }
  const data = await parsed(response);
  if (response.ok) return data;
  throw problemOf(response, data);
}

export async function parsed(response) {
  const text = await response.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return text;
  }
}

export function problemOf(response, data) {
  const problem =
    data && typeof data === "object"
      ? data
      : { title: response.statusText || `HTTP ${response.status}`, detail: String(data ?? "") };
  return new ApiError(response.status, problem, retryAfterMs(response, problem));
}

// The problem's retry_after_ms is exact; Retry-After (seconds, or a date) is its rounding.
function retryAfterMs(response, problem) {
  if (Number.isFinite(problem.retry_after_ms)) return problem.retry_after_ms;
  const header = response.headers.get("Retry-After");
  if (header === null) return null;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return seconds * 1000;
  const at = Date.parse(header);
  return Number.isNaN(at) ? null : Math.max(0, at - Date.now());
}
