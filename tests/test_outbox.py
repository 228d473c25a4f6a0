"""The outbox's bookkeeping: an offset is finished only once every record produced for it has
settled; a record that fails is sent again, and one that still fails stops the worker
instead of finishing its offset; its delivery thread serves reports until it is closed.

`FakeProducer` stands in for confluent-kafka's producer with just the calls the outbox makes,
and the tests deliver its reports by hand, as the broker's acknowledgements would arrive:
this tests our bookkeeping, not Kafka (tests/test_worker.py runs it against a real broker).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, Message
from prometheus_client import REGISTRY

from imagegen.consumers.crashes import CrashLedger
from imagegen.consumers.jobs import Job, Polled, now_ms
from imagegen.consumers.outbox import Outbox
from imagegen.consumers.outcomes import Outcomes
from imagegen.consumers.retry import RetryPolicy
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import load_settings
from imagegen.infra.tracing import start_span
from imagegen.schemas import GenerationRequest, GenerationResult, Stage, Status, decode, encode
from imagegen.schemas.topics import DLQ, RESULTS

OFFSET = Polled("imagegen.render", partition=2, offset=17, generation=0)
TIMEOUT_S = 10
# Resends come at once: these tests wait for events, never for a backoff.
POLICY = RetryPolicy(max_attempts=3, base_delay_s=0.001, outage_budget_s=0)


@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    on_delivery: Callable[[KafkaError | None, object], None]

    def acknowledge(self) -> None:
        self.on_delivery(None, None)

    def fail(self, code: int = KafkaError._MSG_TIMED_OUT) -> None:
        self.on_delivery(KafkaError(code), None)


class FakeProducer:
    """Keeps what is produced; `poll` serves the reports queued by `report`. A `produce`
    raises instead while `refusals` has errors left, and for a value over `max_bytes`, as
    librdkafka's does for one over `message.max.bytes`."""

    def __init__(
        self,
        full_for: int = 0,
        refusals: list[KafkaError] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.produced: list[Produced] = []
        self.arrived: queue.SimpleQueue[Produced] = queue.SimpleQueue()  # each, as produced
        self._full_for = full_for  # how many produce calls find the local queue full
        self._refusals = list(refusals or [])
        self._max_bytes = max_bytes
        self._reports: queue.SimpleQueue[tuple[Produced, KafkaError | None]] = queue.SimpleQueue()
        self._unreported = 0

    def produce(self, topic: str, *, key, value, headers, on_delivery) -> None:
        if self._full_for:
            self._full_for -= 1
            raise BufferError("Local: Queue full")
        if self._refusals:
            raise KafkaException(self._refusals.pop(0))
        if self._max_bytes is not None and len(value) > self._max_bytes:
            raise KafkaException(
                KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
            )

        def reported(error: KafkaError | None, message: object) -> None:
            self._unreported -= 1
            on_delivery(error, message)

        record = Produced(topic, key, value, headers, reported)
        self._unreported += 1
        self.produced.append(record)
        self.arrived.put(record)

    def report(self, record: Produced, error: KafkaError | None = None) -> None:
        """Report on `record` in the next poll, as a broker's report arrives."""
        self._reports.put((record, error))

    def poll(self, timeout: float) -> int:
        try:
            record, error = self._reports.get(timeout=timeout)
        except queue.Empty:
            return 0
        record.on_delivery(error, None)
        return 1

    def __len__(self) -> int:
        """Records not yet reported on, as librdkafka counts them."""
        return self._unreported


class Undeliverable:
    """Records what the outbox reports as undeliverable, as the worker's stop would."""

    def __init__(self) -> None:
        self.reports: queue.SimpleQueue[str] = queue.SimpleQueue()

    def __call__(self, why: str) -> None:
        self.reports.put(why)


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def undeliverable() -> Undeliverable:
    return Undeliverable()


@pytest.fixture
def outbox(producer: FakeProducer, undeliverable: Undeliverable) -> Iterator[Outbox]:
    outbox = Outbox(producer, POLICY, undeliverable)
    yield outbox
    outbox.close()


def test_an_offset_finishes_once_every_record_sent_for_it_is_acknowledged(
    outbox: Outbox, producer: FakeProducer
) -> None:
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.results", b"k", b"result", [("traceparent", b"00-...")])
        sends.send("imagegen.dlq", b"k", b"letter")
    result, letter = producer.produced
    assert (result.topic, result.headers) == ("imagegen.results", [("traceparent", b"00-...")])
    assert (letter.topic, letter.headers) == ("imagegen.dlq", None)

    letter.acknowledge()
    assert outbox.finished() == []
    result.acknowledge()
    assert outbox.finished() == [OFFSET]
    assert outbox.finished() == []  # taken once


def test_an_acknowledgement_inside_the_block_does_not_finish_the_offset_early(
    outbox: Outbox, producer: FakeProducer
) -> None:
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.results", b"k", b"result")
        producer.produced[0].acknowledge()  # before the block's next send
        assert outbox.finished() == []
        sends.send("imagegen.dlq", b"k", b"letter")
    assert outbox.finished() == []
    producer.produced[1].acknowledge()
    assert outbox.finished() == [OFFSET]


def test_a_block_whose_records_are_all_acknowledged_finishes_as_it_ends(
    outbox: Outbox, producer: FakeProducer
) -> None:
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.dlq", b"k", b"letter")
        producer.produced[0].acknowledge()
        assert outbox.finished() == []
    assert outbox.finished() == [OFFSET]


def test_a_failed_delivery_is_sent_again_and_its_offset_waits_for_that(
    outbox: Outbox, producer: FakeProducer, undeliverable: Undeliverable
) -> None:
    acknowledged: list[str] = []
    outbox.start(on_crash=lambda: None)
    with outbox.sending(OFFSET) as sends:
        sends.send(
            "imagegen.results", b"k", b"result", on_acknowledged=lambda: acknowledged.append("r")
        )
        sends.send("imagegen.dlq", b"k", b"letter")
    first, letter = producer.arrived.get(timeout=TIMEOUT_S), producer.arrived.get(timeout=TIMEOUT_S)
    producer.report(letter)
    producer.report(first, KafkaError(KafkaError._MSG_TIMED_OUT))
    again = producer.arrived.get(timeout=TIMEOUT_S)  # sent again by the delivery thread
    assert (again.topic, again.value) == ("imagegen.results", b"result")
    assert outbox.finished() == [] and acknowledged == []
    producer.report(again)
    outbox.close()
    assert outbox.finished() == [OFFSET]
    assert acknowledged == ["r"]
    assert undeliverable.reports.empty()


def test_a_produce_that_raises_is_tried_again() -> None:
    producer = FakeProducer(refusals=[KafkaError(KafkaError._UNKNOWN_PARTITION)])
    outbox = Outbox(producer, POLICY, Undeliverable())
    outbox.start(on_crash=lambda: None)
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.dlq", b"k", b"letter")  # raises inside: retried, not raised here
    producer.report(producer.arrived.get(timeout=TIMEOUT_S))
    outbox.close()
    assert [record.value for record in producer.produced] == [b"letter"]
    assert outbox.finished() == [OFFSET]


def test_a_record_that_still_fails_stops_the_worker_and_never_finishes_its_offset() -> None:
    producer = FakeProducer(max_bytes=1000)
    undeliverable = Undeliverable()
    outbox = Outbox(producer, POLICY, undeliverable)
    outbox.start(on_crash=lambda: None)
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.results", b"k", b"result")
        sends.send("imagegen.dlq", b"k", b"x" * 2000)
    why = undeliverable.reports.get(timeout=TIMEOUT_S)
    assert "Cannot write a 2001-byte record to imagegen.dlq for imagegen.render[2]@17" in why
    assert "after 3 attempt(s) (IMAGEGEN_MAX_ATTEMPTS)" in why
    assert "raise the topic's max.message.bytes" in why
    producer.report(producer.produced[0])  # the result is acknowledged; the letter never is
    outbox.close()
    assert outbox.finished() == []
    assert undeliverable.reports.empty()  # reported once


def test_a_failed_delivery_on_its_last_attempt_is_undeliverable(
    producer: FakeProducer, undeliverable: Undeliverable
) -> None:
    outbox = Outbox(producer, RetryPolicy(1, 0.001, 0), undeliverable)
    outbox.start(on_crash=lambda: None)
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.dlq", b"k", b"letter")
    producer.report(producer.arrived.get(timeout=TIMEOUT_S), KafkaError(KafkaError._MSG_TIMED_OUT))
    why = undeliverable.reports.get(timeout=TIMEOUT_S)
    assert "did not acknowledge it within the producer's message.timeout.ms" in why
    outbox.close()
    assert outbox.finished() == []
    assert len(producer.produced) == 1


def test_a_block_that_raises_leaves_its_offset_unfinished(
    outbox: Outbox, producer: FakeProducer
) -> None:
    with pytest.raises(ValueError, match="building the dead letter"), outbox.sending(OFFSET) as s:
        s.send("imagegen.results", b"k", b"result")
        raise ValueError("building the dead letter failed")
    producer.produced[0].acknowledge()
    assert outbox.finished() == []


def test_nothing_more_can_be_sent_for_a_finished_offset(
    outbox: Outbox, producer: FakeProducer
) -> None:
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.results", b"k", b"result")
    producer.produced[0].acknowledge()
    assert outbox.finished() == [OFFSET]
    with pytest.raises(RuntimeError, match="is finished"):
        sends.send("imagegen.dlq", b"k", b"late")
    assert len(producer.produced) == 1


def test_offsets_come_out_in_the_order_they_finished(
    outbox: Outbox, producer: FakeProducer
) -> None:
    offsets = [Polled("imagegen.render", 0, offset, generation=3) for offset in range(3)]
    for offset in offsets:
        with outbox.sending(offset) as sends:
            sends.send("imagegen.results", b"k", str(offset.offset).encode())
    for index in (2, 0, 1):
        producer.produced[index].acknowledge()
    assert outbox.finished() == [offsets[2], offsets[0], offsets[1]]


def test_a_full_local_queue_is_waited_out() -> None:
    producer = FakeProducer(full_for=2)
    with Outbox(producer, POLICY, Undeliverable()).sending(OFFSET) as sends:
        sends.send("imagegen.results", b"k", b"result")
    assert [record.value for record in producer.produced] == [b"result"]


def test_only_acknowledged_records_count_as_produced(
    outbox: Outbox, producer: FakeProducer
) -> None:
    topic = "test-outbox-produced"

    def produced() -> float:
        return REGISTRY.get_sample_value("imagegen_records_produced_total", {"topic": topic}) or 0

    before = produced()
    with outbox.sending(OFFSET) as sends:
        sends.send(topic, b"k", b"delivered")
        sends.send(topic, b"k", b"failed")
    producer.produced[0].acknowledge()
    producer.produced[1].fail()
    assert produced() == before + 1


def test_the_delivery_thread_serves_reports_until_closed(
    outbox: Outbox, producer: FakeProducer
) -> None:
    served_by: queue.SimpleQueue[threading.Thread] = queue.SimpleQueue()
    crashes: list[BaseException | None] = []
    outbox.start(on_crash=lambda: crashes.append(sys.exc_info()[1]))
    with outbox.sending(OFFSET) as sends:
        sends.send(
            "imagegen.results",
            b"k",
            b"result",
            on_acknowledged=lambda: served_by.put(threading.current_thread()),
        )
    producer.report(producer.produced[0])
    delivery = served_by.get(timeout=TIMEOUT_S)
    assert delivery.name == "delivery"
    assert outbox.finished() == [OFFSET]

    outbox.close()
    assert not delivery.is_alive()  # close joined it
    assert crashes == []


def test_close_waits_for_the_reports_of_what_was_sent(
    outbox: Outbox, producer: FakeProducer
) -> None:
    outbox.start(on_crash=lambda: None)
    with outbox.sending(OFFSET) as sends:
        sends.send("imagegen.results", b"k", b"result")
    closing = threading.Thread(target=outbox.close)
    closing.start()
    producer.report(producer.arrived.get(timeout=TIMEOUT_S), KafkaError(KafkaError._TRANSPORT))
    producer.report(producer.arrived.get(timeout=TIMEOUT_S))  # sent again while closing
    closing.join(TIMEOUT_S)
    assert not closing.is_alive()
    assert outbox.finished() == [OFFSET]


def test_a_crashed_delivery_thread_reports_its_crash() -> None:
    crash = RuntimeError("poll failed")

    class CrashingProducer(FakeProducer):
        def poll(self, timeout: float) -> int:
            raise crash

    crashed: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()
    outbox = Outbox(CrashingProducer(), POLICY, Undeliverable())
    outbox.start(on_crash=lambda: crashed.put((threading.current_thread().name, sys.exc_info()[1])))
    assert crashed.get(timeout=TIMEOUT_S) == ("delivery", crash)


def test_a_failed_result_is_acknowledged_before_its_offset_finishes(
    outbox: Outbox, producer: FakeProducer, tmp_path: Path
) -> None:
    # The store is only a name here: a letter this small never spills.
    outcomes = Outcomes(
        outbox, CrashLedger(tmp_path), ObjectStore(load_settings()), "worker-1", events=None
    )
    request = GenerationRequest.new(user_id="ann", prompt="a kite", width=64, height=64, steps=2)
    message = Message(
        topic=OFFSET.topic,
        partition=OFFSET.partition,
        offset=OFFSET.offset,
        key=request.kafka_key,
        value=encode(request),
        timestamp=(TIMESTAMP_CREATE_TIME, now_ms()),
    )
    job = Job(message, OFFSET, request, now_ms(), start_span("test", []))
    outbox.start(on_crash=lambda: None)

    outcomes.failed(job, RuntimeError("the pipeline failed"), Stage.RENDER, attempts=1)
    result = producer.arrived.get(timeout=TIMEOUT_S)
    letter = producer.arrived.get(timeout=TIMEOUT_S)
    assert (result.topic, letter.topic) == (RESULTS, DLQ)
    producer.report(letter)
    producer.report(result, KafkaError(KafkaError._TRANSPORT))
    again = producer.arrived.get(timeout=TIMEOUT_S)
    assert decode(GenerationResult, again.value).status is Status.FAILED
    assert outbox.finished() == []  # the dead letter alone does not finish it
    producer.report(again)
    outbox.close()
    assert outbox.finished() == [OFFSET]
