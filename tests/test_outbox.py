"""The outbox's bookkeeping: an offset is finished only once every record produced for it has
settled, and its delivery thread serves reports until it is closed.

`FakeProducer` stands in for confluent-kafka's producer with just the calls the outbox makes,
and the tests deliver its reports by hand, as the broker's acknowledgements would arrive:
this tests our bookkeeping, not Kafka (tests/test_worker.py runs it against a real broker).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError
from prometheus_client import REGISTRY

from imagegen.consumers.jobs import Polled
from imagegen.consumers.outbox import Outbox

OFFSET = Polled("imagegen.render", partition=2, offset=17, generation=0)
TIMEOUT_S = 10


@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    on_delivery: Callable[[KafkaError | None, object], None]

    def acknowledge(self) -> None:
        self.on_delivery(None, None)

    def fail(self) -> None:
        self.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)


class FakeProducer:
    """Keeps what is produced; `poll` and `flush` serve the reports queued by `report`."""

    def __init__(self, full_for: int = 0) -> None:
        self.produced: list[Produced] = []
        self.flushed = threading.Event()
        self._full_for = full_for  # how many produce calls find the local queue full
        self._reports: queue.SimpleQueue[Produced] = queue.SimpleQueue()

    def produce(self, topic: str, *, key, value, headers, on_delivery) -> None:
        if self._full_for:
            self._full_for -= 1
            raise BufferError("Local: Queue full")
        self.produced.append(Produced(topic, key, value, headers, on_delivery))

    def report(self, record: Produced) -> None:
        """Acknowledge `record` in the next poll, as a broker's report arrives."""
        self._reports.put(record)

    def poll(self, timeout: float) -> int:
        try:
            self._reports.get(timeout=timeout).acknowledge()
        except queue.Empty:
            return 0
        return 1

    def flush(self, timeout: float) -> int:
        while self.poll(0):
            pass
        self.flushed.set()
        return 0


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def outbox(producer: FakeProducer) -> Outbox:
    return Outbox(producer)


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


def test_a_replacement_sent_for_a_failed_delivery_is_waited_for_too(
    outbox: Outbox, producer: FakeProducer
) -> None:
    errors: list[KafkaError | None] = []

    with outbox.sending(OFFSET) as sends:

        def delivered(error: KafkaError | None) -> None:
            errors.append(error)
            if error is not None:
                sends.send("imagegen.dlq", b"k", b"letter")

        sends.send("imagegen.results", b"k", b"result", on_delivered=delivered)
    producer.produced[0].fail()
    assert [error.code() for error in errors if error is not None] == [KafkaError._MSG_TIMED_OUT]
    assert outbox.finished() == []
    (replacement,) = producer.produced[1:]
    assert replacement.topic == "imagegen.dlq"
    replacement.acknowledge()
    assert outbox.finished() == [OFFSET]


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
    with Outbox(producer).sending(OFFSET) as sends:
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
        sends.send(topic, b"k", b"lost")
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
            on_delivered=lambda _: served_by.put(threading.current_thread()),
        )
    producer.report(producer.produced[0])
    delivery = served_by.get(timeout=TIMEOUT_S)
    assert delivery.name == "delivery"
    assert outbox.finished() == [OFFSET]

    outbox.close()
    assert producer.flushed.is_set()
    assert not delivery.is_alive()  # close joined it
    assert crashes == []


def test_a_crashed_delivery_thread_reports_its_crash() -> None:
    crash = RuntimeError("poll failed")

    class CrashingProducer(FakeProducer):
        def poll(self, timeout: float) -> int:
            raise crash

    crashed: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()
    outbox = Outbox(CrashingProducer())
    outbox.start(on_crash=lambda: crashed.put((threading.current_thread().name, sys.exc_info()[1])))
    assert crashed.get(timeout=TIMEOUT_S) == ("delivery", crash)
