"""Every error the gateway answers, as an RFC 9457 problem (`application/problem+json`).

A client branches on `type` (`urn:imagegen:problem:<slug>`) and `status`, never on
`detail`. `SLUGS` is the whole table; `Problem` is raised anywhere in a route and turned into
a response by `install`, which also answers FastAPI's own validation errors, unknown routes
and unexpected exceptions in the same shape.

Extensions, where they apply: `job_id`, `job` (the Job, where one exists), `retry_after_ms`
(with a `Retry-After` header in whole seconds, rounded up), `errors` (a list of
{"loc", "msg"}), `limit_bytes`.
"""

from __future__ import annotations

import logging
import math
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
}


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
        if exc.status_code == 405:
            problem = Problem("method-not-allowed", f"{request.method} is not allowed here")
        else:
            problem = Problem("not-found", f"no route {request.url.path}")
        return problem.response(request.url.path)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        problem = Problem("internal-error", "the gateway failed; the log has the details")
        return problem.response(request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
