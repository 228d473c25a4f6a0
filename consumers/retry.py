"""Retry in place: transient errors back off exponentially with full jitter."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from imagegen.infra.metrics import RETRIES
from imagegen.schemas.errors import ImagegenError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_DELAY_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay_s: float

    def delay(self, attempt: int) -> float:
        """Full jitter: a random wait up to the doubled delay, so retries of many workers
        after a shared outage spread out instead of arriving together."""
        return random.uniform(0, min(MAX_DELAY_S, self.base_delay_s * 2 ** (attempt - 1)))


class GaveUp(ImagegenError):
    """The last error of an operation that failed permanently or ran out of attempts."""

    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(f"{type(error).__name__}: {error} (after {attempts} attempts)")
        self.error = error
        self.attempts = attempts


def is_transient(error: BaseException) -> bool:
    return isinstance(error, ImagegenError) and error.transient


class Interrupted(ImagegenError):
    """The worker is stopping: the operation was abandoned between attempts, unfinished."""


def retrying(
    policy: RetryPolicy,
    what: str,
    operation: Callable[[], T],
    stop: threading.Event,
    *,
    stage: str,
) -> tuple[T, int]:
    """Run `operation` until it succeeds; return its value and the attempts it took.

    `stage` (render, store, ...) labels the retries in `imagegen_retries_total` and the logs.

    Raises `GaveUp` (with the last error as its cause) at once for a permanent error, or
    when a transient one outlasts `policy.max_attempts`; `Interrupted` when `stop` is set
    while waiting to try again.
    """
    attempt = 1
    while True:
        try:
            return operation(), attempt
        except Exception as error:
            if not is_transient(error) or attempt >= policy.max_attempts:
                raise GaveUp(error, attempt) from error
            delay = policy.delay(attempt)
            RETRIES.labels(stage).inc()
            log.warning(
                "%s failed (attempt %d), retrying in %.2fs: %s",
                what,
                attempt,
                delay,
                error,
                extra={"stage": stage},
            )
            if stop.wait(delay):
                raise Interrupted(f"stopped while retrying {what}") from error
            attempt += 1
