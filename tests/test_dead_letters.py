"""Dead letters keep the original bytes and carry their context in headers."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import TopicPartition

from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.settings import Settings
from imagegen.schemas import DeadLetter, Stage
from imagegen.schemas.dead_letters import MAX_STACKTRACE_CHARS
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.topics import DLQ


def failure(causes: int = 0) -> BaseException:
    """A ValueError raised on top of a chain of `causes` distinct earlier exceptions."""
    cause: BaseException | None = None
    for layer in range(causes):
        try:
            raise KeyError(f"layer {layer}") from cause
        except KeyError as exc:
            cause = exc
    try:
        raise ValueError("steps: must be at most 100") from cause
    except ValueError as exc:
        return exc


def letter(**changes: object) -> DeadLetter:
    fields = {
        "error": failure(),
        "stage": Stage.VALIDATE,
        "topic": "imagegen.requests",
        "partition": 4,
        "offset": 1234,
        "timestamp_ms": 1_790_000_000_000,
        "key": b"alice",
        "value": b"\xff\x00 not json",
        "headers": [("traceparent", b"00-abc-def-01"), ("dlq.stage", b"stale")],
        "attempts": 3,
        "group": "imagegen-processor",
    }
    fields.update(changes)
    return DeadLetter.from_failure(**fields)


def test_headers_round_trip() -> None:
    original = letter()
    restored = DeadLetter.from_kafka(original.key, original.value, original.headers())
    assert restored == original
    assert restored.error_class == "builtins.ValueError"
    assert restored.error_message == "steps: must be at most 100"
    assert "Traceback" in restored.error_stacktrace


def test_original_headers_survive_but_stale_dlq_headers_do_not() -> None:
    headers = letter().headers()
    assert ("traceparent", b"00-abc-def-01") in headers
    assert ("dlq.stage", b"validate") in headers
    assert ("dlq.stage", b"stale") not in headers


def test_stacktrace_is_bounded_and_keeps_the_innermost_frames() -> None:
    deep = letter(error=failure(causes=400))
    assert len(deep.error_stacktrace) <= MAX_STACKTRACE_CHARS + 100
    assert deep.error_stacktrace.startswith("[...truncated]")
    assert deep.error_stacktrace.rstrip().endswith("ValueError: steps: must be at most 100")


def test_a_record_without_context_is_not_a_dead_letter() -> None:
    headers = [(name, data) for name, data in letter().headers() if name != "dlq.group"]
    with pytest.raises(InvalidMessage, match=r"dlq\.group is missing"):
        DeadLetter.from_kafka(b"k", b"v", headers)


def test_dead_letter_survives_the_broker_byte_for_byte(settings: Settings) -> None:
    original = letter(key=uuid.uuid4().bytes, value=b"\x00\xff\xfe raw bytes \x80")
    producer = make_producer(settings)
    delivered = []
    producer.produce(
        DLQ,
        key=original.key,
        value=original.value,
        headers=original.headers(),
        on_delivery=lambda err, msg: delivered.append((err, msg)),
    )
    producer.flush(10)
    ((error, message),) = delivered
    assert error is None

    consumer = make_consumer(settings, group_id=f"test-{uuid.uuid4()}")
    consumer.assign([TopicPartition(DLQ, message.partition(), message.offset())])
    try:
        consumed = consumer.poll(10)
        assert consumed is not None and consumed.error() is None
        restored = DeadLetter.from_kafka(consumed.key(), consumed.value(), consumed.headers())
    finally:
        consumer.close()
    assert restored == original
