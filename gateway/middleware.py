"""What every request goes through: the body size limit, and one log line and metrics.

The limit holds on the declared `Content-Length` (refused before a byte is read) and on the
bytes actually read (a chunked body stops at the limit): 413 `body-too-large`, stating it.
A route may have a limit of its own (the edits route takes two images).

The request log is one line per request through the project's logging (`infra.logs`):
method, path, status and milliseconds in the message, the user as its `user_id` field. It
never holds the Authorization header, a key, a query string or a signed URL: only the
path is logged, and the gateway's paths hold ids alone. (uvicorn's own access log, which
logs query strings, is off: `gateway.server`.)
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen.gateway.auth import USER_SCOPE_KEY
from imagegen.gateway.problems import Problem

log = logging.getLogger("imagegen.gateway.requests")

REQUESTS = Counter(
    "imagegen_gateway_requests_total",
    "HTTP requests answered by the gateway, by method, route and status.",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "imagegen_gateway_request_seconds",
    "Time to answer an HTTP request (to the end of the body; streams count whole).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def too_large(limit: int) -> Problem:
    return Problem(
        "body-too-large",
        f"the body is larger than the limit of {limit} bytes",
        limit_bytes=limit,
    )


class BodyLimit:
    def __init__(
        self, app: ASGIApp, limit_bytes: int, route_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.default_limit = limit_bytes
        self.route_limits = route_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.route_limits.get(scope["path"], self.default_limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(limit).response(scope["path"])(scope, receive, send)
            return
        read = 0

        async def limited() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, limited, send)


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            route = _route(scope)
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            REQUEST_SECONDS.labels(scope["method"], route).observe(seconds)
            log.info(
                "%s %s %d %.1fms",
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                extra={"user_id": scope.get(USER_SCOPE_KEY)},
            )


def _route(scope: Scope) -> str:
    """The route's template (`/v1/images/jobs/{job_id}`): a bounded label, unlike paths."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
