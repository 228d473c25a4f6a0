"""Retry in place: transient errors back off exponentially with full jitter.

Two kinds of transient error, bounded differently:
- an outage (the object store or the broker unreachable: `ObjectStoreUnavailable`,
  `BrokerUnavailable`) is retried for as long as `outage_budget_s`, however many attempts
  that takes: a restart of the store must not fail the requests that meet it;
- any other (out of memory, say) is retried up to `max_attempts` attempts.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from imagegen.infra.metrics import RETRIES
from imagegen.schemas.errors import BrokerUnavailable, ImagegenError, ObjectStoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_DELAY_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay_s: float
    outage_budget_s: float

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


def is_outage(error: BaseException) -> bool:
    return isinstance(error, ObjectStoreUnavailable | BrokerUnavailable)


class Interrupted(ImagegenError):
    """The worker is stopping: the operation was abandoned between attempts, unfinished."""


class Outage:
    """How long an outage has lasted, as the operations that share this clock see it: from
    the first outage error after a success until the next success. Operations queued behind
    others meet the outage late; sharing the clock, they still give up once it has lasted
    the budget, instead of each waiting a budget of its own. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._since: float | None = None
        self._lock = threading.Lock()

    def lasted_s(self) -> float:
        """Note an outage error now; return how long the outage has lasted."""
        now = self.clock()
        with self._lock:
            if self._since is None:
                self._since = now
            return now - self._since

    def end(self) -> None:
        with self._lock:
            self._since = None


def retrying(
    policy: RetryPolicy,
    what: str,
    operation: Callable[[], T],
    stop: threading.Event,
    *,
    stage: str,
    outage: Outage | None = None,
) -> tuple[T, int]:
    """Run `operation` until it succeeds; return its value and the attempts it took.

    `stage` (render, store, ...) labels the retries in `imagegen_retries_total` and the logs.
    `outage` is the clock that operations on the same services share; by default the
    operation has one of its own.

    Raises `GaveUp` (with the last error as its cause) at once for a permanent error, when
    an outage outlasts `policy.outage_budget_s`, or when other transient errors outlast
    `policy.max_attempts`; `Interrupted` when `stop` is set while waiting to try again.
    """
    shared = outage or Outage()
    own = Outage(shared.clock)  # an operation that keeps failing gives up even while others succeed
    attempt = 1
    other_failures = 0
    while True:
        try:
            value = operation()
        except Exception as error:
            if is_outage(error):
                lasted_s = max(own.lasted_s(), shared.lasted_s())
                left_s = policy.outage_budget_s - lasted_s
                if left_s <= 0:
                    raise GaveUp(error, attempt) from error
                delay = min(policy.delay(attempt), left_s)
                budget = (
                    f" (unreachable for {lasted_s:.0f}s of a {policy.outage_budget_s:g}s "
                    "budget, IMAGEGEN_OUTAGE_BUDGET_S)"
                )
            else:
                other_failures += 1
                if not is_transient(error) or other_failures >= policy.max_attempts:
                    raise GaveUp(error, attempt) from error
                delay = policy.delay(other_failures)
                budget = ""
            RETRIES.labels(stage).inc()
            log.warning(
                "%s failed (attempt %d), retrying in %.2fs%s: %s",
                what,
                attempt,
                delay,
                budget,
                error,
                extra={"stage": stage},
            )
            if stop.wait(delay):
                raise Interrupted(f"stopped while retrying {what}") from error
            attempt += 1
        else:
            shared.end()
            return value, attempt
