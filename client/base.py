"""What `Client` and `AsyncClient` share: where the API is, the key, and how each call is
written and read. Only the sending differs between the two."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx

from imagegen.client.errors import ClientConfigError, error_from

DEFAULT_TIMEOUT_S = 30.0
#: The longest `Prefer: wait` the gateway honours.
MAX_WAIT_S = 60
#: How much longer than its `Prefer: wait` a waiting call may take to be answered.
WAIT_MARGIN_S = 5.0
JOBS = "/v1/images/jobs"
#: How a stream is retried after a dropped connection.
RECONNECT_DELAY_S = 1.0
MAX_RECONNECTS = 10


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    #: The call's own timeout, where the client's default is too short for it.
    timeout_s: float | None = None


def connection(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and the headers every call carries."""
    url = base_url or os.environ.get("IMAGEGEN_GATEWAY_URL")
    key = api_key or os.environ.get("IMAGEGEN_API_KEY")
    if not url or not key:
        missing = [
            name
            for name, value in (("IMAGEGEN_GATEWAY_URL", url), ("IMAGEGEN_API_KEY", key))
            if not value
        ]
        raise ClientConfigError(
            f"set {' and '.join(missing)} (or pass base_url= and api_key=): the client needs "
            "the gateway's address and an API key (`imagegen keys create --user ...`)"
        )
    return url.rstrip("/"), {"Authorization": f"Bearer {key}"}


def generation(
    prompt: str, idempotency_key: str | None, wait_s: float | None, fields: dict[str, Any]
) -> Call:
    headers = {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    timeout_s = None
    if wait_s is not None:
        if not 0 < wait_s <= MAX_WAIT_S:
            raise ValueError(f"wait_s must be more than 0 and at most {MAX_WAIT_S} (got {wait_s})")
        headers["Prefer"] = f"wait={wait_s:g}"
        # The gateway holds the answer up to wait_s: the read must outlast that.
        timeout_s = wait_s + WAIT_MARGIN_S
    body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
    return Call("POST", "/v1/images/generations", json=body, headers=headers, timeout_s=timeout_s)


def job_page(limit: int, cursor: str | None) -> Call:
    params: dict[str, Any] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    return Call("GET", JOBS, params=params)


def stream_headers(last_event_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


def timeout_of(call: Call, default: httpx.Timeout) -> httpx.Timeout:
    """The client's timeout, with a read long enough for what `call` asks the gateway to do."""
    if call.timeout_s is None or (default.read is not None and default.read >= call.timeout_s):
        return default
    return httpx.Timeout(
        connect=default.connect, read=call.timeout_s, write=default.write, pool=default.pool
    )


def checked(response: httpx.Response) -> httpx.Response:
    """`response` if it is a success or a redirect; its `ApiError` otherwise."""
    if response.status_code >= 400:
        raise error_from(response)
    return response
