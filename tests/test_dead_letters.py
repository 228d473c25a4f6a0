"""Dead letters keep the original bytes and carry their context in headers."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import TopicPartition

from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.settings import Settings
from imagegen.schemas import DeadLetter, Stage
from imagegen.schemas.dead_letters import (
    MAX_KEPT_MARK_BYTES,
    MAX_STACKTRACE_CHARS,
    pack_original,
    unpack_original,
)
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


def test_a_letter_counts_every_byte_it_sends() -> None:
    small = letter(value=b"v", headers=[])
    headers = [("x-pad", b"p" * 5000)] * 3
    padded = letter(value=b"v", headers=headers)
    assert padded.size_bytes() - small.size_bytes() == 3 * (len("x-pad") + 5000 + 10)
    assert letter(value=b"v" * 100_000).size_bytes() - small.size_bytes() >= 99_999


def test_a_spilled_letter_keeps_its_context_and_names_its_object() -> None:
    mark = b"imagegen.dlq/0/7;" + b"a" * 64
    original = letter(value=b"x" * 2_000_000, headers=[("replay.of", mark), ("h", b"y" * 10)])
    spilled = original.spilled("dlq/abc.json")
    assert spilled.key is None and spilled.value == b""
    # Only a copy of the replay mark stays, so that replays can be followed without S3.
    assert spilled.original_headers == [("replay.of", mark)]
    assert spilled.size_bytes() < 20_000
    read_back = DeadLetter.from_kafka(spilled.key, spilled.value, spilled.headers())
    assert read_back == spilled
    assert read_back.original_object == "dlq/abc.json"
    assert read_back.error_message == original.error_message

    restored = read_back.restored(pack_original(original))
    assert (restored.key, restored.value) == (original.key, original.value)
    assert restored.original_headers == original.original_headers


def test_a_mark_too_long_to_be_genuine_stays_only_in_the_object() -> None:
    forged = b"f" * (MAX_KEPT_MARK_BYTES + 1)
    original = letter(headers=[("replay.of", forged)])
    assert original.spilled("dlq/abc.json").original_headers == []
    assert unpack_original(pack_original(original))[2] == [("replay.of", forged)]


def test_a_packed_original_keeps_none_apart_from_empty() -> None:
    for key, value in ((None, None), (b"", b""), (b"\x00k", b"\xff" * 3)):
        original = letter(key=key, value=value, headers=[("h", b""), ("h", b"\x01")])
        assert unpack_original(pack_original(original)) == (key, value, original.original_headers)


@pytest.mark.parametrize(
    "packed",
    [
        b"",
        b"\xff",
        b"[]",
        b'{"format": "other/1", "key": null, "value": null, "headers": []}',
        b'{"format": "imagegen.dlq.original/1", "key": null, "value": null}',
        b'{"format": "imagegen.dlq.original/1", "key": 5, "value": null, "headers": []}',
        b'{"format": "imagegen.dlq.original/1", "key": "!!", "value": null, "headers": []}',
        b'{"format": "imagegen.dlq.original/1", "key": null, "value": null, "headers": [[1, ""]]}',
        b'{"format": "imagegen.dlq.original/1", "key": null, "value": null, "headers": [["a"]]}',
    ],
)
def test_anything_but_a_packed_original_is_refused(packed: bytes) -> None:
    with pytest.raises(InvalidMessage, match="not a packed dead-letter original"):
        unpack_original(packed)
