"""What the API answers instead of a job, as exceptions: one per kind of problem.

The gateway answers every error as an RFC 9457 problem whose `type` is stable
(`urn:imagegen:problem:<slug>`); `error_from` picks the class by status and slug, so that a
program branches on the class, never on `detail`.
"""

from __future__ import annotations

import math
from typing import Any

import httpx

PROBLEM_PREFIX = "urn:imagegen:problem:"


class ClientConfigError(Exception):
    """The client was not told where the API is, or with which key."""


class ApiError(Exception):
    """An answer that is not a success. `problem` is the body as the gateway sent it."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.type: str = str(problem.get("type", "about:blank"))
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.slug or self.title}: {self.detail}")

    @property
    def slug(self) -> str | None:
        """The problem's stable name, such as `rate-limited`; None for a foreign type."""
        if self.type.startswith(PROBLEM_PREFIX):
            return self.type.removeprefix(PROBLEM_PREFIX)
        return None

    @property
    def job_id(self) -> str | None:
        value = self.problem.get("job_id")
        return value if isinstance(value, str) else None


class Unauthorized(ApiError):
    """401: no key, or one that is malformed, unknown or revoked."""


class NotFound(ApiError):
    """404: no such job, or another user's."""


class Conflict(ApiError):
    """409: the job has ended (cancel), has no image yet, or was canceled at intake."""


class InvalidRequest(ApiError):
    """413 or 422: the request itself is wrong; sending it again does not help."""


class _Retryable(ApiError):
    @property
    def retry_after_s(self) -> float | None:
        """How long to wait before sending the same request again, where the API said."""
        value = self.problem.get("retry_after_ms")
        if isinstance(value, int | float) and math.isfinite(value):
            return value / 1000
        return None


class RateLimited(_Retryable):
    """429: the user's rate limit; retry after `retry_after_s`."""


class Overloaded(_Retryable):
    """503 `overloaded`: the fleet could not start the job before its deadline."""


class Unavailable(_Retryable):
    """503 for any other reason, or a 5xx: the gateway or what it needs is down."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
}


def error_from(response: httpx.Response) -> ApiError:
    """The exception for a response that is not a success."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem = body if isinstance(body, dict) else {"detail": response.text[:500]}
    if response.status_code == 503 and problem.get("type") == PROBLEM_PREFIX + "overloaded":
        return Overloaded(503, problem)
    kind = _BY_STATUS.get(response.status_code)
    if kind is None:
        kind = Unavailable if response.status_code >= 500 else ApiError
    return kind(response.status_code, problem)
