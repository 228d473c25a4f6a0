"""The client factories against the real broker: delivery, headers, and offsets stored only
when the owner says so."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Message
from confluent_kafka.admin import NewTopic

from imagegen.infra.kafka import check_broker, make_admin, make_consumer, make_producer
from imagegen.infra.settings import Settings, load_settings
from imagegen.infra.topics import TOPICS, ensure_topics
from imagegen.schemas.errors import BrokerUnavailable
from tests.helpers import free_port


@pytest.fixture
def topic(settings: Settings) -> str:
    name = f"test.{uuid.uuid4().hex}"
    admin = make_admin(settings)  # must outlive the future, or librdkafka cancels it
    admin.create_topics([NewTopic(name, num_partitions=1)])[name].result(10)
    return name


def produce(settings: Settings, topic: str, count: int) -> None:
    producer = make_producer(settings)
    errors = []
    for i in range(count):
        producer.produce(
            topic,
            key=f"k{i}",
            value=f"v{i}",
            headers=[("n", str(i).encode())],
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(10) == 0
    assert errors == []


def poll_values(consumer: Consumer, count: int, timeout_s: float = 20.0) -> list[Message]:
    """Poll until `count` messages arrived; each poll blocks on the broker, no sleeping."""
    messages: list[Message] = []
    polls = int(timeout_s / 0.5)
    for _ in range(polls):
        if len(messages) == count:
            break
        message = consumer.poll(0.5)
        if message is not None:
            assert message.error() is None, message.error()
            messages.append(message)
    assert len(messages) == count, f"got {len(messages)} of {count} messages"
    return messages


def test_produced_records_arrive_in_order_with_headers(settings: Settings, topic: str) -> None:
    produce(settings, topic, 20)
    consumer = make_consumer(settings, group_id=f"test-{uuid.uuid4()}")
    consumer.subscribe([topic])
    try:
        messages = poll_values(consumer, 20)
    finally:
        consumer.close()
    assert [m.value() for m in messages] == [f"v{i}".encode() for i in range(20)]
    assert [m.headers() for m in messages] == [[("n", str(i).encode())] for i in range(20)]


def test_only_stored_offsets_are_committed(settings: Settings, topic: str) -> None:
    produce(settings, topic, 3)
    group = f"test-{uuid.uuid4()}"

    first = make_consumer(settings, group_id=group)
    first.subscribe([topic])
    messages = poll_values(first, 3)
    first.store_offsets(message=messages[0])  # only the first message counts as handled
    first.close()  # commits what was stored

    second = make_consumer(settings, group_id=group)
    second.subscribe([topic])
    try:
        redelivered = poll_values(second, 2)
    finally:
        second.close()
    assert [m.value() for m in redelivered] == [b"v1", b"v2"]


def test_ensure_topics_is_idempotent(settings: Settings) -> None:
    admin = make_admin(settings)
    assert ensure_topics(admin, settings) == []  # the session fixture created them already
    existing = admin.list_topics(timeout=10).topics
    for spec in TOPICS:
        assert len(existing[spec.name].partitions) == spec.partitions


def test_an_unreachable_broker_says_what_to_do() -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(BrokerUnavailable, match="imagegen stack up"):
        check_broker(settings, timeout_s=1)
