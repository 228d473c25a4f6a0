"""The job lifecycle at intake: cancellations before admission, deadlines, load shedding,
priority routing and job events.

The decision and the estimate are tested as plain logic first; then the processor as a real
process against a real broker, with a fleet whose throughput it can measure.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaException, Message, TopicPartition

from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.settings import Settings, load_settings
from imagegen.processors.intake import Admit, Answer, Drop, Intake, Outcome
from imagegen.processors.load import FleetLoad, QueueEstimate, StartRate
from imagegen.producers import RequestPublisher
from imagegen.schemas import (
    CancelRequest,
    EventType,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    Reason,
    Status,
    decode,
    encode,
)
from imagegen.schemas.topics import (
    CANCELLATIONS,
    EVENTS,
    RENDER,
    RENDER_BATCH,
    RESULTS,
    WORKER_GROUP,
)
from tests import test_processor
from tests.helpers import events_until, produce, read_topic, results_for

processor_factory = test_processor.processor_factory  # the fixture, shared

# ---- the decision, as logic --------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FixedLoad:
    def __init__(self, queue: QueueEstimate | None) -> None:
        self.queue = queue

    def estimate(self, request: GenerationRequest) -> QueueEstimate | None:
        return self.queue


NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def make_intake(
    cancels: dict[str, CancelRequest] | None = None,
    load: FixedLoad | None = None,
    **settings: object,
) -> Intake:
    limits = {"rate_user_per_s": 0.001, "rate_user_burst": 2.0, **settings}
    book = cancels if cancels is not None else {}

    def cancellation(request: GenerationRequest) -> CancelRequest | None:
        cancel = book.get(request.request_id)
        return cancel if cancel is not None and cancel.user_id == request.user_id else None

    return Intake(
        load_settings(**limits),
        {},
        {},
        1,
        Clock(NOW.timestamp()),
        cancellation=cancellation,
        load=load,
    )


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest.new(
        **{"user_id": "ann", "prompt": "a boat", "submitted_at": NOW, **fields}
    )


def decide(intake: Intake, record: GenerationRequest, offset: int, **options: bool) -> Outcome:
    return intake.decide(encode(record), 0, offset, key=record.kafka_key, **options)


def cancel_of(record: GenerationRequest, user_id: str | None = None) -> CancelRequest:
    return CancelRequest.new(request_id=record.request_id, user_id=user_id or record.user_id)


def test_a_request_its_user_canceled_is_answered_canceled_and_costs_nothing() -> None:
    canceled, after = request(), request()
    intake = make_intake({canceled.request_id: cancel_of(canceled)}, rate_user_burst=1.0)
    outcome = decide(intake, canceled, 0)
    assert isinstance(outcome, Answer)
    assert (outcome.result.status, outcome.result.reason) == (Status.CANCELED, Reason.CANCELED)
    assert "before the processor admitted it" in outcome.result.detail
    assert isinstance(decide(intake, after, 1), Admit)  # the user's one token is still there
    # Not remembered: its publish retry is answered again, never admitted.
    assert isinstance(decide(intake, canceled, 2), Answer)


def test_a_cancellation_from_another_user_is_ignored() -> None:
    record = request()
    intake = make_intake({record.request_id: cancel_of(record, user_id="mallory")})
    assert isinstance(decide(intake, record, 0), Admit)


def test_a_request_past_its_deadline_is_answered_expired_and_costs_nothing() -> None:
    late = request(expires_at=NOW - timedelta(seconds=1))
    old = request(submitted_at=NOW - timedelta(seconds=61))  # past the 60 s default TTL
    intake = make_intake(default_ttl_s=60.0, rate_user_burst=1.0)
    for offset, record in enumerate([late, old]):
        outcome = decide(intake, record, offset)
        assert isinstance(outcome, Answer)
        assert (outcome.result.status, outcome.result.reason) == (
            Status.EXPIRED,
            Reason.DEADLINE_EXCEEDED,
        )
    assert "passed 1.0s before" in decide(intake, late, 2).result.detail
    assert isinstance(decide(intake, request(expires_at=NOW + timedelta(seconds=1)), 3), Admit)


def test_canceled_and_expired_come_before_duplicate() -> None:
    first = request(idempotency_key="k")
    canceled, late = request(idempotency_key="k"), request(idempotency_key="k", expires_at=NOW)
    intake = make_intake({canceled.request_id: cancel_of(canceled)})
    assert isinstance(decide(intake, first, 0), Admit)
    assert decide(intake, canceled, 1).result.status is Status.CANCELED
    assert decide(intake, late, 2).result.status is Status.EXPIRED
    assert decide(intake, request(idempotency_key="k"), 3).result.status is Status.DUPLICATE


def test_records_of_an_admitted_request_are_left_to_the_worker() -> None:
    # Admitted, then canceled and past its deadline: only the worker knows whether the
    # render began, so the intake neither answers a redelivery nor a publish retry.
    record = request(expires_at=NOW + timedelta(seconds=5))
    cancels: dict[str, CancelRequest] = {}
    intake = make_intake(cancels)
    assert isinstance(decide(intake, record, 7), Admit)
    cancels[record.request_id] = cancel_of(record)
    intake._clock.now += 10  # type: ignore[attr-defined]
    assert isinstance(decide(intake, record, 7), Admit)  # the same record, redelivered
    assert isinstance(decide(intake, record, 8), Drop)  # a publish retry
    # An operator's replay is a new attempt: the cancellation counts for it.
    assert decide(intake, record, 9, replayed=True).result.status is Status.CANCELED


def test_a_request_that_cannot_start_in_time_is_rejected_overloaded() -> None:
    # 10 s to live, 25 s of queue ahead: a request as long-lived starts in time once the
    # queue has drained by 15 s, plus the half second the backlog reading may be old.
    queue = QueueEstimate(ahead=50, wait_s=25.0, margin_s=0.5)
    intake = make_intake(load=FixedLoad(queue), rate_user_burst=1.0)
    outcome = decide(intake, request(expires_at=NOW + timedelta(seconds=10)), 0)
    assert isinstance(outcome, Answer)
    result = outcome.result
    assert (result.status, result.reason) == (Status.REJECTED, Reason.OVERLOADED)
    assert result.retry_after_ms == 15_500
    assert "about 50 request(s) ahead" in result.detail
    # It took no token: the next request, which has time, is admitted with the estimate.
    roomy = request(expires_at=NOW + timedelta(seconds=25))
    assert decide(intake, roomy, 1) == Admit(roomy, queue)


def test_nothing_is_shed_without_a_measured_throughput() -> None:
    queue = QueueEstimate(ahead=10_000, wait_s=None, margin_s=0.5)
    record = request(expires_at=NOW + timedelta(seconds=1))
    intake = make_intake(load=FixedLoad(queue))
    assert decide(intake, record, 0) == Admit(record, queue)
    unread = make_intake(load=FixedLoad(None))  # no backlog read yet
    assert decide(unread, record, 0) == Admit(record)


def test_overload_is_checked_before_the_rate_limit_and_after_duplicate() -> None:
    queue = QueueEstimate(ahead=50, wait_s=25.0, margin_s=0.0)
    intake = make_intake(load=FixedLoad(queue), rate_user_burst=1.0)
    first = request(idempotency_key="k", expires_at=NOW + timedelta(seconds=60))
    assert isinstance(decide(intake, first, 0), Admit)  # the one token
    shed = decide(intake, request(expires_at=NOW + timedelta(seconds=1)), 1)
    assert shed.result.reason is Reason.OVERLOADED  # not rate_limited
    again = decide(intake, request(idempotency_key="k", expires_at=NOW), 2)
    assert again.result.status is Status.EXPIRED
    duplicate = request(idempotency_key="k", expires_at=NOW + timedelta(seconds=1))
    assert decide(intake, duplicate, 3).result.status is Status.DUPLICATE


# ---- the estimate, as logic --------------------------------------------------------------


def test_no_rate_until_the_fleet_has_been_busy_for_a_short_window() -> None:
    clock = Clock(0.0)
    rate = StartRate(window_s=30.0, idle_gap_s=15.0, short_window_s=5.0, clock=clock)
    assert rate.per_s() is None  # no worker seen
    rate.add()
    clock.now = 4.0
    rate.add()
    assert rate.per_s() is None  # busy for 4 s only
    clock.now = 5.0
    assert rate.per_s() == pytest.approx(2 / 5)
    clock.now = 4.0 + 15.1
    assert rate.per_s() is None  # nothing started lately: the fleet is idle or gone


def test_an_idle_spell_does_not_read_as_a_slow_fleet() -> None:
    clock = Clock(0.0)
    rate = StartRate(window_s=30.0, idle_gap_s=15.0, short_window_s=5.0, clock=clock)
    rate.add()  # one start, then 20 s without work
    for second in range(20, 27):  # then busy, starting one a second
        clock.now = second
        rate.add()
    # Over the busy run since t=20, not the 26 s since the first start (8 / 26 = 0.3).
    assert rate.per_s() == pytest.approx(7 / 6)


def test_the_rate_is_at_least_the_last_short_windows() -> None:
    clock = Clock(0.0)
    rate = StartRate(window_s=30.0, idle_gap_s=15.0, short_window_s=5.0, clock=clock)
    for _ in range(30):  # a steady 1/s for 30 s
        clock.now += 1
        rate.add()
    assert rate.per_s() == pytest.approx(1.0, rel=0.05)
    clock.now += 1
    rate.add(10)  # the fleet grew: the last 5 s saw 14 starts
    assert rate.per_s() == pytest.approx(14 / 5)


def test_the_wait_is_the_backlog_drained_since_it_was_read_over_the_rate() -> None:
    clock = Clock(50.0)
    load = FleetLoad(refresh_s=1.0, clock=clock)
    interactive, batch = request(), request(priority="batch")
    assert load.estimate(interactive) is None  # nothing read yet
    mark = load.mark()
    load.admitted(interactive)  # admitted while the read was on: not in it
    load.observe(mark, interactive=40, batch=60, per_s=10.0)
    assert load.estimate(interactive) == QueueEstimate(41, 4.1, 1.0)
    # Batch work waits behind both queues.
    assert load.estimate(batch) == QueueEstimate(101, 10.1, 1.0)
    clock.now += 2.0  # 20 started since the read
    load.admitted(batch)
    assert load.estimate(interactive) == QueueEstimate(21, 2.1, 1.0)
    assert load.estimate(batch) == QueueEstimate(82, pytest.approx(8.2), 1.0)
    clock.now += 7.0  # the whole backlog drained: only what was admitted since
    assert load.estimate(interactive) == QueueEstimate(1, 0.1, 1.0)
    # The next read includes the admissions: they are not counted twice.
    load.observe(load.mark(), interactive=1, batch=1, per_s=None)
    assert load.estimate(batch) == QueueEstimate(2, None, 1.0)


def test_a_stale_reading_estimates_nothing() -> None:
    clock = Clock(0.0)
    load = FleetLoad(refresh_s=1.0, clock=clock)
    load.observe(load.mark(), interactive=1000, batch=0, per_s=1.0)
    clock.now += 10.0
    assert load.estimate(request()) is not None
    clock.now += 0.1
    assert load.estimate(request()) is None


# ---- the processor, against the broker ---------------------------------------------------


def events_for(stack: Settings, expected: set[str], timeout_s: float = 120) -> list[JobEvent]:
    """The job events of the `expected` requests, read until each has one."""
    found = events_until(stack, lambda found: expected <= found.keys(), timeout_s)
    return [event for request_id in expected for event in found[request_id]]


def queued_ids(stack: Settings, topic: str, expected: set[str]) -> list[str]:
    """Request ids on a render topic, read until every id in `expected` is there."""
    ids: list[str] = []

    def seen_all(messages: list[Message]) -> bool:
        ids[:] = [decode(GenerationRequest, m.value()).request_id for m in messages]
        return expected <= set(ids)

    read_topic(stack, topic, seen_all, timeout_s=120)
    return ids


def publish_cancellations(stack: Settings, cancels: list[CancelRequest]) -> None:
    produce(stack, CANCELLATIONS, cancels)


def test_the_processor_ends_canceled_and_expired_requests_and_routes_by_priority(
    processor_factory,
    isolated_stack: Settings,
) -> None:
    canceled = GenerationRequest.new(user_id="ann", prompt="canceled")
    foreign = GenerationRequest.new(user_id="ann", prompt="canceled by someone else")
    expired = GenerationRequest.new(
        user_id="ann", prompt="late", expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    batch = GenerationRequest.new(user_id="ann", prompt="whenever", priority="batch")
    interactive = GenerationRequest.new(user_id="ann", prompt="now")
    # Published before the processor starts: it reads the book to the end before it consumes.
    publish_cancellations(
        isolated_stack,
        [
            CancelRequest.new(request_id=canceled.request_id, user_id="ann"),
            CancelRequest.new(request_id=foreign.request_id, user_id="mallory"),
        ],
    )
    service = processor_factory()
    with RequestPublisher(isolated_stack) as publisher:
        for record in (canceled, foreign, expired, batch, interactive):
            publisher.publish(record)

    answers = results_for(isolated_stack, {canceled.request_id, expired.request_id})
    (answer,) = answers[canceled.request_id]
    assert (answer.status, answer.reason) == (Status.CANCELED, Reason.CANCELED)
    (answer,) = answers[expired.request_id]
    assert (answer.status, answer.reason) == (Status.EXPIRED, Reason.DEADLINE_EXCEEDED)
    # One user, one partition, decided in order: by the time the last is queued, all are.
    rendered = queued_ids(isolated_stack, RENDER, {foreign.request_id, interactive.request_id})
    assert canceled.request_id not in rendered and expired.request_id not in rendered
    assert batch.request_id not in rendered
    assert queued_ids(isolated_stack, RENDER_BATCH, {batch.request_id}) == [batch.request_id]
    assert {foreign.request_id, interactive.request_id} == set(rendered)

    events = events_for(
        isolated_stack,
        {r.request_id for r in (canceled, foreign, expired, batch, interactive)},
    )
    told = {(e.request_id, e.type, e.status) for e in events}
    assert told == {
        (canceled.request_id, EventType.FINISHED, Status.CANCELED),
        (expired.request_id, EventType.FINISHED, Status.EXPIRED),
        (foreign.request_id, EventType.ADMITTED, None),
        (batch.request_id, EventType.ADMITTED, None),
        (interactive.request_id, EventType.ADMITTED, None),
    }
    for event in events:
        assert event.user_id == "ann"
        if event.type is EventType.ADMITTED:
            # No worker started anything yet: a position, but no estimated start.
            assert event.queue_position is not None and event.estimated_start_at is None
    service.assert_running()


class Fleet:
    """A render fleet with a fixed pace, made of real Kafka clients: a consumer in the
    worker group takes one admitted request every `1 / per_s` seconds (on a fixed
    schedule, so that a slow round trip does not slow the pace), commits it, and sends its
    `started` event, as a worker that renders each in that time would."""

    def __init__(self, stack: Settings, per_s: float) -> None:
        self._stack = stack
        self._interval_s = 1 / per_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0
        self.failure: BaseException | None = None

    def __enter__(self) -> Fleet:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping.set()
        self._thread.join(30)
        assert self.failure is None, self.failure

    def _run(self) -> None:
        consumer = make_consumer(self._stack, WORKER_GROUP, **{"enable.auto.commit": False})
        producer = make_producer(self._stack)
        try:
            consumer.subscribe([RENDER])
            next_start: float | None = None  # the schedule begins with the first request
            while not self._stopping.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error() is not None:
                    continue
                next_start = next_start or time.monotonic()
                request = decode(GenerationRequest, message.value())
                consumer.commit(message, asynchronous=False)
                started = JobEvent(
                    request_id=request.request_id,
                    user_id=request.user_id,
                    type=EventType.STARTED,
                    at=datetime.now(UTC),
                    worker_id="test-fleet",
                )
                producer.produce(EVENTS, key=started.kafka_key, value=encode(started))
                producer.poll(0)
                self.started += 1
                # The render this fleet pretends to do.
                next_start += self._interval_s
                self._stopping.wait(max(0.0, next_start - time.monotonic()))
            producer.flush(10)
        except (KafkaException, ValueError) as exc:
            self.failure = exc
        finally:
            consumer.close()


def outcome_of(stack: Settings, record: GenerationRequest) -> GenerationResult | JobEvent:
    """The processor's word on `record`: its result, or its `admitted` event."""
    found: list[GenerationResult | JobEvent] = []
    consumer = make_consumer(stack, group_id=f"test-outcome-{uuid.uuid4()}")
    try:
        partitions = [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in (RESULTS, EVENTS)
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        consumer.assign(partitions)
        deadline = time.monotonic() + 120
        while not found:
            assert time.monotonic() < deadline, f"no outcome for {record.request_id}"
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            if record.request_id.encode() != message.key():
                continue
            if message.topic() == RESULTS:
                found.append(decode(GenerationResult, message.value()))
            else:
                event = decode(JobEvent, message.value())
                if event.type is EventType.ADMITTED:
                    found.append(event)
    finally:
        consumer.close()
    return found[0]


def short_lived(publisher: RequestPublisher, life_s: float) -> GenerationRequest:
    record = GenerationRequest.new(
        user_id=f"probe-{uuid.uuid4().hex[:8]}",
        prompt="soon",
        expires_at=datetime.now(UTC) + timedelta(seconds=life_s),
    )
    publisher.publish(record)
    return record


@pytest.fixture
def backlog(isolated_stack: Settings) -> Iterator[list[GenerationRequest]]:
    """80 requests already queued for the fleet, as a processor would have admitted them."""
    queued = [GenerationRequest.new(user_id=f"u{i % 7}", prompt=f"{i}") for i in range(80)]
    produce(isolated_stack, RENDER, queued)
    yield queued


def test_an_overloaded_rejection_says_truly_when_to_retry(
    processor_factory,
    isolated_stack: Settings,
    backlog: list[GenerationRequest],
) -> None:
    processor_factory(rate_user_per_s="1000", rate_user_burst="1000")
    with RequestPublisher(isolated_stack) as publisher:
        # Up and deciding, with no throughput measured yet: admitted however long the queue.
        first = short_lived(publisher, life_s=600.0)
        assert isinstance(outcome_of(isolated_stack, first), JobEvent)
        with Fleet(isolated_stack, per_s=5.0) as fleet:
            shed = overloaded_probe(isolated_stack, publisher, life_s=4.0)
            # About 60 requests ahead at 5/s is 12 s of wait, 8 s more than the probe has.
            assert shed.retry_after_ms is not None
            assert 1_000 < shed.retry_after_ms < 30_000, shed
            time.sleep(shed.retry_after_ms / 1000)  # what is tested: the wait it asked for
            retry = short_lived(publisher, life_s=4.0)
            admitted = outcome_of(isolated_stack, retry)
            assert isinstance(admitted, JobEvent), (shed.detail, admitted.detail)
            # It was told it would start within its life, and about when.
            assert admitted.estimated_start_at is not None
            assert retry.expires_at is not None
            assert admitted.estimated_start_at <= retry.expires_at
            assert fleet.started > 0


def overloaded_probe(
    stack: Settings, publisher: RequestPublisher, life_s: float
) -> GenerationResult:
    """Publish short-lived requests until one is shed. The processor watches the fleet
    busy for a few seconds before it sheds; until then each probe is admitted (and joins
    the queue), so they are spaced to add a few requests, not hundreds."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = outcome_of(stack, short_lived(publisher, life_s))
        if isinstance(answer, GenerationResult):
            assert (answer.status, answer.reason) == (Status.REJECTED, Reason.OVERLOADED)
            return answer
        time.sleep(0.5)
    raise AssertionError("no request was shed")
