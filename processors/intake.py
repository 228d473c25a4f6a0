"""The intake decision for one record: validate (the schema, and the key against user_id),
honour a cancellation, expire, dedupe, shed load, rate limit by cost, admit, in that order;
and the answer when its sends fail.

`Intake.decide` is pure logic over two dict-like stores, the dedupe memory and the token
buckets, and two read-only views it is handed: the cancellations (`CancelBook.honoured`)
and the queue estimate (`FleetLoad.estimate`). The faust app (`imagegen.processors.app`)
passes its tables and those in, and performs the outcome.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pydantic import BaseModel, ValidationError

from imagegen.infra.settings import Settings
from imagegen.infra.webhook_targets import WebhookTargetRefused, check_url
from imagegen.processors.dedupe import Deduper, Seen, Verdict
from imagegen.processors.load import QueueEstimate
from imagegen.processors.ratelimit import TOKEN_WORK, RateLimiter, request_cost
from imagegen.processors.state import Store
from imagegen.schemas import (
    CancelRequest,
    GenerationRequest,
    GenerationResult,
    Reason,
    Stage,
    Status,
    decode,
)
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.fields import RequestId, UserId, utc_now
from imagegen.schemas.results import task_fields
from imagegen.schemas.uploads import foreign_inputs, user_prefix


@dataclass(frozen=True)
class Admit:
    """Forward to the request's render topic. `queue` is what waits ahead of it, where known."""

    request: GenerationRequest
    queue: QueueEstimate | None = None


@dataclass(frozen=True)
class Answer:
    """Publish this result (rejected or duplicate); render nothing."""

    result: GenerationResult
    #: The request answered, whose webhook (if any) is told; None where its webhook is the
    #: reason it is refused.
    request: GenerationRequest | None


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


class Load(Protocol):
    """What the intake asks of the fleet's load (`FleetLoad`)."""

    def estimate(self, request: GenerationRequest) -> QueueEstimate | None: ...


class _NoLoad:
    def estimate(self, request: GenerationRequest) -> QueueEstimate | None:
        return None


def _no_cancellations(request: GenerationRequest) -> CancelRequest | None:
    return None


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


# How much of a wrong key a rejection quotes: keys are the publishers' to make up, any size.
_KEY_SHOWN = 64


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
        *,
        cancellation: Callable[[GenerationRequest], CancelRequest | None] = _no_cancellations,
        load: Load | None = None,
    ) -> None:
        """`cancellation` gives a request's honoured cancellation (`CancelBook.honoured`);
        `load` the queue ahead of it (`FleetLoad`). Without them nothing is canceled or shed."""
        self._deduper = Deduper(dedupe_memory, settings.dedupe_window_s)
        self._limiter = RateLimiter(settings, buckets, partitions)
        self._clock = clock
        self._cancellation = cancellation
        self._load = load or _NoLoad()
        self._default_ttl_s = settings.default_ttl_s
        self._allow_private_webhooks = settings.webhook_allow_private

    def decide(
        self,
        value: bytes | None,
        partition: int,
        offset: int,
        *,
        key: bytes | None,
        replayed: bool = False,
    ) -> Outcome:
        """The outcome for one record. Raises `StageFailed` only on an unexpected error.

        `key` is the record's Kafka key, which must be its user_id: the per-user limit and
        dedupe are exact only because all of a user's requests share one partition.

        `replayed` marks an operator's replay from the DLQ, its mark verified: the same
        request_id again is then admitted instead of dropped, because its first attempt
        failed somewhere, and it skips the rate limit, because the user already paid for
        that attempt. A worker never renders an image twice: it publishes the stored one
        when it exists. A replay is canceled, expired and shed like any request.

        A record of a request already admitted (a redelivery of the admitting record, or a
        publish retry) is admitted again or dropped before anything else is asked: its
        first admission went to a worker, which honours a cancellation and a deadline
        itself and alone knows whether the render began. Answering it here could
        contradict the worker's answer.
        """
        with _stage(Stage.VALIDATE):
            try:
                request = decode(GenerationRequest, value)
            except InvalidMessage as exc:
                return Invalid(exc, _rejection_for_invalid(value, exc))
            if key != request.kafka_key:
                return _misrouted(request, key)
            refused = _refused_webhook(request, self._allow_private_webhooks) or _foreign_inputs(
                request
            )
            if refused is not None:
                return refused

        now = self._clock()
        with _stage(Stage.DEDUPE):
            verdict = self._deduper.check(request, partition, offset, now)
        if verdict.seen is Seen.REDELIVERY:
            with _stage(Stage.RATELIMIT):
                queue = self._load.estimate(request)
            return Admit(request, queue)  # tokens were spent the first time
        if verdict.seen is Seen.PUBLISH_RETRY and not replayed:
            return Drop(request.request_id)

        # None of these spend tokens: each is checked before the rate limit. (Admission
        # control, like the limit: the wire contract has no stage of its own for it.)
        with _stage(Stage.RATELIMIT):
            deadline = self._deadline(request)
            ended = self._canceled(request) or _expired(request, deadline, now)
        if ended is not None:
            return ended
        if verdict.seen is Seen.DUPLICATE:
            return _duplicate(request, verdict)
        with _stage(Stage.RATELIMIT):
            queue = self._load.estimate(request)
            shed = _overloaded(request, queue, deadline, now)
        if shed is not None:
            return shed

        if not replayed:
            with _stage(Stage.RATELIMIT):
                refusal = self._rate_limit(request, partition, now)
            if refusal is not None:
                return refusal
        with _stage(Stage.DEDUPE):
            self._deduper.remember(request, partition, offset, now)
        return Admit(request, queue)

    def _deadline(self, request: GenerationRequest) -> float:
        return request.deadline(self._default_ttl_s).timestamp()

    def _canceled(self, request: GenerationRequest) -> Answer | None:
        # Only the request's own user's cancellation counts; the book counts foreign ones.
        cancel = self._cancellation(request)
        if cancel is None:
            return None
        return Answer(
            _result(
                request,
                Status.CANCELED,
                reason=Reason.CANCELED,
                detail=f"canceled by its user (at {cancel.requested_at.isoformat()}) before "
                "the processor admitted it; nothing was rendered",
            ),
            request,
        )

    def unpublished(
        self, outcome: Outcome, partition: int, offset: int, error: BaseException
    ) -> GenerationResult | None:
        """The answer for a record whose outcome could not be sent: `failed` with reason
        `publish_error`. An admission's dedupe entry is released with it, so the user's
        retry is admitted instead of being dropped for the whole window. None where no
        one can be answered: the record's ids were unreadable, or it sent nothing."""
        match outcome:
            case Admit(request=request):
                self._deduper.forget(request, partition, offset)
                request_id, user_id = request.request_id, request.user_id
            case Answer(result=result) | Invalid(result=GenerationResult() as result):
                request_id, user_id = result.request_id, result.user_id
            case _:
                return None
        detail = (
            f"the processor could not send this request's outcome on ({type(error).__name__}: "
            f"{error}); the record is in the DLQ, and publishing the request again is safe"
        )
        return GenerationResult(
            request_id=request_id,
            user_id=user_id,
            status=Status.FAILED,
            reason=Reason.PUBLISH_ERROR,
            detail=detail[:4000],
            completed_at=utc_now(),
        )

    def _rate_limit(self, request: GenerationRequest, partition: int, now: float) -> Answer | None:
        """A rejection, or None once the request's cost is taken from its buckets."""
        cost = request_cost(request.width, request.height, request.steps)
        largest = self._limiter.largest_cost(request.user_id)
        if cost > largest:
            return Answer(
                _result(
                    request,
                    Status.REJECTED,
                    reason=Reason.EXCEEDS_BURST,
                    detail=_exceeds_burst_detail(request, cost, largest),
                ),
                request,
            )
        retry_after_ms = self._limiter.take(request.user_id, partition, cost, now)
        if retry_after_ms is None:
            return None
        return Answer(
            _result(
                request,
                Status.REJECTED,
                reason=Reason.RATE_LIMITED,
                retry_after_ms=retry_after_ms,
                detail=f"rate limit reached: this request costs {cost} token(s); "
                f"retry in {retry_after_ms} ms",
            ),
            request,
        )

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
        **task_fields(request),
        completed_at=utc_now(),
    )


def _expired(request: GenerationRequest, deadline: float, now: float) -> Answer | None:
    if now < deadline:
        return None
    return Answer(
        _result(
            request,
            Status.EXPIRED,
            reason=Reason.DEADLINE_EXCEEDED,
            detail=f"its deadline {_utc(deadline)} passed {now - deadline:.1f}s before the "
            "processor could admit it; nothing was rendered",
        ),
        request,
    )


def _refused_webhook(request: GenerationRequest, allow_private: bool) -> Answer | None:
    """A webhook URL this deployment will never deliver to (by its syntax: where its name
    resolves is checked at each delivery) is refused now, not dead-lettered later."""
    if request.webhook_url is None:
        return None
    try:
        check_url(request.webhook_url, allow_private)
    except WebhookTargetRefused as refused:
        detail = f"webhook_url: {refused}"
        return Answer(
            _result(request, Status.REJECTED, reason=Reason.INVALID_REQUEST, detail=detail), None
        )
    return None


def _foreign_inputs(request: GenerationRequest) -> Answer | None:
    """An edit may read only its own user's uploads: anyone who may write imagegen.requests
    sets any user_id, but naming another user's key must not make a worker read it."""
    foreign = foreign_inputs(request.user_id, request.inputs)
    if not foreign:
        return None
    fields = [name for name in ("image", "mask") if getattr(request, name) in foreign]
    detail = (
        f"{' and '.join(fields)} must be uploads of the request's own user, under "
        f"{user_prefix(request.user_id)} (`imagegen upload FILE --user {request.user_id}` "
        "stores one there)"
    )
    return Answer(
        _result(request, Status.REJECTED, reason=Reason.INVALID_REQUEST, detail=detail), request
    )


def _duplicate(request: GenerationRequest, verdict: Verdict) -> Answer:
    return Answer(
        _result(
            request,
            Status.DUPLICATE,
            duplicate_of=verdict.admitted_request_id,
            detail=f"idempotency key {request.idempotency_key!r} was already used by "
            f"request {verdict.admitted_request_id}",
        ),
        request,
    )


def _overloaded(
    request: GenerationRequest, queue: QueueEstimate | None, deadline: float, now: float
) -> Answer | None:
    """A rejection when the wait ahead outlasts the time left before the deadline. With no
    measured wait (no throughput known), nothing is shed: the worker still expires it."""
    if queue is None or queue.wait_s is None:
        return None
    left_s = deadline - now
    if queue.wait_s <= left_s:
        return None
    # A request with as long to live starts in time once the queue has drained by the
    # excess; the margin covers the age of the backlog reading the next decision sees.
    retry_after_ms = math.ceil((queue.wait_s - left_s + queue.margin_s) * 1000)
    return Answer(
        _result(
            request,
            Status.REJECTED,
            reason=Reason.OVERLOADED,
            retry_after_ms=retry_after_ms,
            detail=f"the render queues are too long for its deadline: about {queue.ahead} "
            f"request(s) ahead, an estimated {queue.wait_s:.1f}s before a render starts, "
            f"{max(left_s, 0.0):.1f}s left before {_utc(deadline)}; retry in "
            f"{retry_after_ms} ms, or allow it longer",
        ),
        request,
    )


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _misrouted(request: GenerationRequest, key: bytes | None) -> Invalid:
    shown = "no key" if key is None else f"key {key[:_KEY_SHOWN]!r}"
    if key is not None and len(key) > _KEY_SHOWN:
        shown += f" (first {_KEY_SHOWN} of {len(key)} bytes)"
    error = InvalidMessage(
        f"the record has {shown}, not its user_id {request.user_id!r}: publish each request "
        "keyed by its user_id (RequestPublisher does), so that a user's requests share one "
        "partition and their rate limit and dedupe hold",
        [("key", "must equal user_id")],
    )
    return Invalid(
        error,
        _result(request, Status.REJECTED, reason=Reason.INVALID_REQUEST, detail=str(error)),
    )


def _exceeds_burst_detail(request: GenerationRequest, cost: int, largest: int) -> str:
    # The same size at fewer steps is the nearest request that fits. It has at least one
    # step: a burst holds at least one token, and sides of at most 2048 make one step of
    # any size cost one token.
    steps = max(1, largest * TOKEN_WORK // (request.width * request.height))
    example = f"{request.width}x{request.height} at {steps} steps"
    return (
        f"this request costs {cost} tokens ({request.width}x{request.height}, "
        f"{request.steps} steps; a token is 512x512 at 25 steps), more than the "
        f"{largest} tokens user {request.user_id!r}'s bucket holds: the largest request "
        f"allowed costs {largest} tokens, width x height x steps at most "
        f"{largest * TOKEN_WORK} (for example {example})"
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
