"""Every error the gateway answers, as an RFC 9457 problem (`application/problem+json`).

A client branches on `type` (`urn:imagegen:problem:<slug>`) and `status`, never on
`detail`. `SLUGS` is the whole table; `Problem` is raised anywhere in a route and turned into
a response by `install`, which also answers FastAPI's own validation errors, unknown routes
and unexpected exceptions in the same shape. A bare HTTP status (Starlette's
`HTTPException`) keeps its status: the slug of `OF_STATUS`, else `http-<status>`.

Extensions, where they apply: `job_id`, `job` (the Job, where one exists), `retry_after_ms`
(with a `Retry-After` header in whole seconds, rounded up), `errors` (a list of
{"loc", "msg"}), `limit_bytes`.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:imagegen:problem:"

#: slug -> (status, title).
SLUGS: dict[str, tuple[int, str]] = {
    "invalid-request": (422, "The request is invalid"),
    "idempotency-key-mismatch": (422, "The idempotency key was used with another body"),
    "unauthorized": (401, "A valid API key is required"),
    "not-found": (404, "No such resource"),
    "method-not-allowed": (405, "The route does not take this method"),
    "body-too-large": (413, "The request body is too large"),
    "rate-limited": (429, "Rate limit reached"),
    "exceeds-burst": (422, "The request costs more than the rate limit ever allows"),
    "overloaded": (503, "The render fleet is overloaded"),
    "unknown-model": (422, "Unknown model"),
    "deadline-exceeded": (422, "The request's deadline passed"),
    "canceled": (409, "The job was canceled"),
    "job-ended": (409, "The job has ended"),
    "image-not-ready": (409, "The job has no image"),
    "unavailable": (503, "A backing service is unavailable"),
    "internal-error": (500, "Internal error"),
    "bad-request": (400, "The request is malformed"),
    "forbidden": (403, "Not allowed"),
    "not-acceptable": (406, "No acceptable representation"),
    "unsupported-media-type": (415, "The body's media type is not supported"),
}
#: The problem a bare HTTP status answers (a Starlette `HTTPException`: an unknown route, a
#: wrong method, or one raised by a dependency), where a slug above means that status.
OF_STATUS: dict[int, str] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    413: "body-too-large",
    415: "unsupported-media-type",
    422: "invalid-request",
    500: "internal-error",
    503: "unavailable",
}
# Any other error status is `http-<status>`: named by its number, which stays the same in
# every Python version, unlike the reason phrases `HTTPStatus` holds.
SLUGS.update(
    {
        f"http-{status.value}": (status.value, status.phrase)
        for status in HTTPStatus
        if status.value >= 400 and status.value not in OF_STATUS
    }
)
#: How long a client waits before it tries again after `unavailable`: a broker or store
#: outage that outlasts it is answered the same way, so a short wait costs little.
UNAVAILABLE_RETRY_AFTER_MS = 2000


class Problem(Exception):
    """An error answer: raise it from a route."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        retry_after_ms: int | None = None,
        **extensions: Any,
    ) -> None:
        if slug not in SLUGS:
            raise ValueError(f"unknown problem slug {slug!r}: add it to SLUGS")
        super().__init__(detail)
        self.slug = slug
        self.status, self.title = SLUGS[slug]
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = {k: v for k, v in extensions.items() if v is not None}
        if retry_after_ms is not None:
            self.extensions["retry_after_ms"] = retry_after_ms
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))

    def response(self, instance: str) -> JSONResponse:
        body = {
            "type": TYPE_PREFIX + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extensions,
        }
        return JSONResponse(body, self.status, headers=self.headers, media_type=MEDIA_TYPE)


def unauthorized(detail: str) -> Problem:
    return Problem("unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def unavailable(detail: str) -> Problem:
    """A backing service (the broker, the object store) failed: 503 with `Retry-After`."""
    return Problem("unavailable", detail, retry_after_ms=UNAVAILABLE_RETRY_AFTER_MS)


def of_status(status: int, detail: str, headers: dict[str, str] | None = None) -> Problem:
    """The problem of a bare HTTP status, keeping the status (and headers, such as a 405's
    `Allow`); a status that is no error is an internal one, as nothing should raise it."""
    slug = OF_STATUS.get(status) or f"http-{status}"
    if slug not in SLUGS:
        return Problem("internal-error", f"the gateway answered status {status}: {detail}")
    return Problem(slug, detail, headers=headers)


def responses(*slugs: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route that answers these problems."""
    described: dict[int | str, dict[str, Any]] = {}
    for slug in ("unauthorized", "unavailable", *slugs):
        status, title = SLUGS[slug]
        entry = described.setdefault(
            status, {"description": "", "content": {MEDIA_TYPE: {"schema": {"type": "object"}}}}
        )
        entry["description"] = "; ".join(filter(None, [entry["description"], f"{slug}: {title}"]))
    return described


def install(app: FastAPI) -> None:
    """Answer every error of `app` as a problem."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": [str(part) for part in error["loc"]], "msg": error["msg"]}
            for error in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        problem = Problem("invalid-request", summary, errors=errors)
        return problem.response(request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return _http_problem(request, exc).response(request.url.path)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        problem = Problem("internal-error", "the gateway failed; the log has the details")
        return problem.response(request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_error)


def _http_problem(request: Request, exc: HTTPException) -> Problem:
    """Starlette's own 404 and 405 say what a client needs better than their detail does."""
    match exc.status_code:
        case 404:
            detail = f"no route {request.url.path}"
        case 405:
            detail = f"{request.method} is not allowed here"
        case _:
            detail = str(exc.detail)
    return of_status(exc.status_code, detail, dict(exc.headers or {}))
