"""The intake decision for one record: validate, dedupe, rate limit, admit, in that order.

`Intake.decide` is pure logic over two dict-like stores, the dedupe memory and the token
buckets; the faust app (`imagegen.processors.app`) passes its tables in and performs the outcome.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from imagegen.infra.settings import Settings
from imagegen.processors.dedupe import Deduper, Seen
from imagegen.processors.ratelimit import RateLimiter
from imagegen.processors.state import Store
from imagegen.schemas import GenerationRequest, GenerationResult, Reason, Stage, Status, decode
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.fields import RequestId, UserId, utc_now


@dataclass(frozen=True)
class Admit:
    """Forward to the render topic."""

    request: GenerationRequest


@dataclass(frozen=True)
class Answer:
    """Publish this result (rejected or duplicate); render nothing."""

    result: GenerationResult


@dataclass(frozen=True)
class Drop:
    """A publish retry of an admitted request: its original's result answers it."""

    request_id: str


@dataclass(frozen=True)
class Invalid:
    """Dead-letter the record; answer it too when its ids could still be read."""

    error: InvalidMessage
    result: GenerationResult | None


Outcome = Admit | Answer | Drop | Invalid


class StageFailed(Exception):
    """An unexpected error inside one intake step; `__cause__` holds the original."""

    def __init__(self, stage: Stage) -> None:
        super().__init__(f"intake failed at stage {stage.value}")
        self.stage = stage


@contextmanager
def _stage(stage: Stage) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise StageFailed(stage) from exc


class _Identity(BaseModel):
    request_id: RequestId
    user_id: UserId


class Intake:
    def __init__(
        self,
        settings: Settings,
        dedupe_memory: Store,
        buckets: Store,
        partitions: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._deduper = Deduper(dedupe_memory, settings.dedupe_window_s)
        self._limiter = RateLimiter(settings, buckets, partitions)
        self._clock = clock

    def decide(
        self, value: bytes | None, partition: int, offset: int, replayed: bool = False
    ) -> Outcome:
        """The outcome for one record. Raises `StageFailed` only on an unexpected error.

        `replayed` marks an operator's replay from the DLQ: the same request_id again is
        then admitted instead of dropped, because its first attempt failed somewhere. A
        worker never renders an image twice: it publishes the stored one when it exists.
        """
        with _stage(Stage.VALIDATE):
            try:
                request = decode(GenerationRequest, value)
            except InvalidMessage as exc:
                return Invalid(exc, _rejection_for_invalid(value, exc))

        now = self._clock()
        with _stage(Stage.DEDUPE):
            verdict = self._deduper.check(request, partition, offset, now)
        if verdict.seen is Seen.REDELIVERY:
            return Admit(request)  # tokens were spent the first time
        if verdict.seen is Seen.PUBLISH_RETRY and not replayed:
            return Drop(request.request_id)
        if verdict.seen is Seen.DUPLICATE:
            return Answer(
                _result(
                    request,
                    Status.DUPLICATE,
                    duplicate_of=verdict.admitted_request_id,
                    detail=f"idempotency key {request.idempotency_key!r} was already used by "
                    f"request {verdict.admitted_request_id}",
                )
            )

        with _stage(Stage.RATELIMIT):
            retry_after_ms = self._limiter.take(request.user_id, partition, now)
        if retry_after_ms is not None:
            return Answer(
                _result(
                    request,
                    Status.REJECTED,
                    reason=Reason.RATE_LIMITED,
                    retry_after_ms=retry_after_ms,
                    detail=f"rate limit reached; retry in {retry_after_ms} ms",
                )
            )
        with _stage(Stage.DEDUPE):
            self._deduper.remember(request, partition, offset, now)
        return Admit(request)

    def expired_dedupe(self, entries: Iterable[tuple[str, list]]) -> list[tuple[str, int]]:
        """The dedupe entries past the window, as (key, partition)."""
        return self._deduper.expired(entries, self._clock())

    def full_buckets(self, entries: Iterable[tuple[str, list]]) -> list[tuple[str, int]]:
        """The token buckets refilled to their burst, as (key, partition)."""
        return self._limiter.full(entries, self._clock())


def _result(
    request: GenerationRequest,
    status: Status,
    *,
    detail: str,
    reason: Reason | None = None,
    retry_after_ms: int | None = None,
    duplicate_of: RequestId | None = None,
) -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id,
        user_id=request.user_id,
        status=status,
        reason=reason,
        detail=detail,
        retry_after_ms=retry_after_ms,
        duplicate_of=duplicate_of,
        model=request.model,
        completed_at=utc_now(),
    )


def _rejection_for_invalid(value: bytes | None, error: InvalidMessage) -> GenerationResult | None:
    """A rejected result for a malformed request whose request_id and user_id are readable."""
    try:
        data = json.loads(value) if value is not None else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        identity = _Identity.model_validate(data)
    except ValidationError:
        return None
    return GenerationResult(
        request_id=identity.request_id,
        user_id=identity.user_id,
        status=Status.REJECTED,
        reason=Reason.INVALID_REQUEST,
        detail=str(error)[:4000],
        completed_at=utc_now(),
    )
