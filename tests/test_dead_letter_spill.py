"""Records near the broker's size limit still become dead letters: the original goes to the
object store, and `imagegen dlq replay` republishes it exactly. Real broker, real S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Message
from minio import Minio

from imagegen.consumers.dlq import read_dlq
from imagegen.infra.dead_letter_spill import fits, restore, spill
from imagegen.infra.kafka import make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.replay_marks import sign
from imagegen.infra.settings import Settings
from imagegen.producers import RequestPublisher
from imagegen.schemas import DeadLetter, GenerationRequest, Stage, decode
from imagegen.schemas.errors import InvalidMessage, ObjectStoreError
from imagegen.schemas.headers import REPLAY_HEADER
from imagegen.schemas.topics import DLQ, RENDER, REQUESTS
from tests.conftest import settings_env
from tests.helpers import read_topic
from tests.processes import Service

HOSTILE_VALUE_BYTES = 1_000_500  # the record that crash-looped the processor


def raised() -> BaseException:
    try:
        raise InvalidMessage("too big")
    except InvalidMessage as exc:
        return exc


def letter(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> DeadLetter:
    return DeadLetter.from_failure(
        error=raised(),
        stage=Stage.VALIDATE,
        topic=REQUESTS,
        partition=1,
        offset=77,
        timestamp_ms=None,
        key=key,
        value=value,
        headers=headers,
        attempts=1,
        group="imagegen-processor",
    )


def test_a_spilled_original_comes_back_exactly(settings: Settings) -> None:
    store = ObjectStore(settings)
    headers = [("origin", b"test"), ("empty", b""), ("origin", b"\x00\xff")]
    original = letter(uuid.uuid4().bytes, os.urandom(1_200_000), headers)
    assert not fits(original)

    sent = spill(original, store)
    assert fits(sent) and sent.value == b""
    assert sent.original_object is not None and sent.original_object.startswith("dlq/")
    stored = store.stat(sent.original_object)
    assert stored is not None and stored.size_bytes > 1_200_000
    assert spill(original, store) == sent  # the same original, the same object

    received = DeadLetter.from_kafka(sent.key, sent.value, sent.headers())
    restored = restore(received, store)
    assert (restored.key, restored.value) == (original.key, original.value)
    assert restored.original_headers == headers


def test_an_object_that_is_not_the_named_original_is_refused(settings: Settings) -> None:
    store = ObjectStore(settings)
    sent = letter(b"k", b"v", [])
    outside = sent.spilled("images/user=ann/secret.png")
    with pytest.raises(InvalidMessage, match="not the name of a spilled original"):
        restore(outside, store)

    name = f"dlq/{hashlib.sha256(uuid.uuid4().bytes).hexdigest()}.json"
    with pytest.raises(ObjectStoreError):
        restore(sent.spilled(name), store)
    store.put_if_absent(name, b"tampered", "application/json")
    with pytest.raises(InvalidMessage, match="does not hold the bytes"):
        restore(sent.spilled(name), store)


# ---- through the processor ---------------------------------------------------------------


@pytest.fixture
def processor(isolated_stack: Settings, tmp_path: Path) -> Iterator[Service]:
    service = Service(["processor"], settings_env(isolated_stack), tmp_path / "processor.log")
    service.start()
    yield service
    service.stop()


def produce(settings: Settings, key: bytes, value: bytes, headers: list) -> tuple[int, int]:
    """Publish one record the default producer limit would refuse; its partition, offset."""
    producer = make_producer(settings, **{"message.max.bytes": 2_000_000})
    reports: list[tuple[object, Message]] = []
    producer.produce(
        REQUESTS,
        key=key,
        value=value,
        headers=headers,
        on_delivery=lambda error, message: reports.append((error, message)),
    )
    assert producer.flush(30) == 0
    ((error, message),) = reports
    assert error is None, error
    return message.partition(), message.offset()


def admitted_after(settings: Settings, user: str) -> None:
    """Ordinary requests on the user's partition are still admitted."""
    requests = [GenerationRequest.new(user_id=user, prompt=f"after {n}") for n in range(3)]
    with RequestPublisher(settings) as publisher:
        for request in requests:
            publisher.publish(request)
    wanted = {request.request_id for request in requests}
    seen: set[str] = set()

    def all_admitted(messages: list[Message]) -> bool:
        seen.update(decode(GenerationRequest, m.value()).request_id for m in messages)
        return wanted <= seen

    read_topic(settings, RENDER, all_admitted, timeout_s=60)


def as_letter(message: Message) -> DeadLetter:
    return DeadLetter.from_kafka(message.key(), message.value(), message.headers())


def dead_letters(settings: Settings, count: int) -> dict[str, DeadLetter]:
    """The DLQ's letters by coordinates, once it holds `count`."""
    found = read_topic(settings, DLQ, lambda ms: len(ms) >= count, timeout_s=60)
    return {f"{DLQ}/{m.partition()}/{m.offset()}": as_letter(m) for m in found}


def spilled_objects(settings: Settings) -> set[str]:
    client = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure,
    )
    listed = client.list_objects(settings.s3_bucket, prefix="dlq/", recursive=True)
    return {item.object_name for item in listed if item.object_name}


def dlq(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegen", "dlq", *args],
        env={**settings_env(settings), "COLUMNS": "250"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def republished(settings: Settings, offset_after: int, value_bytes: int) -> Message:
    """The replayed copy: the first record of its size on imagegen.requests past `offset_after`."""

    def copies(messages: list[Message]) -> list[Message]:
        return [
            m
            for m in messages
            if m.offset() > offset_after and len(m.value() or b"") == value_bytes
        ]

    return copies(read_topic(settings, REQUESTS, copies, timeout_s=60))[0]


def test_a_megabyte_record_is_dead_lettered_and_replayed_exactly(
    isolated_stack: Settings, processor: Service
) -> None:
    value = b"x" * HOSTILE_VALUE_BYTES
    partition, offset = produce(isolated_stack, b"alice", value, [("origin", b"test")])
    admitted_after(isolated_stack, "alice")
    processor.assert_running()

    ((where, first),) = dead_letters(isolated_stack, 1).items()
    assert (first.original_topic, first.original_partition, first.original_offset) == (
        REQUESTS,
        partition,
        offset,
    )
    assert first.value == b"" and first.original_object is not None
    assert spilled_objects(isolated_stack) == {first.original_object}

    replayed = dlq(isolated_stack, "replay", "--yes")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1 selected records" in replayed.stdout
    copy = republished(isolated_stack, offset, HOSTILE_VALUE_BYTES)
    assert copy.value() == value and copy.key() == b"alice"
    assert copy.headers() == [("origin", b"test"), (REPLAY_HEADER, sign(where, isolated_stack))]

    # The cause persists: the copy fails again, and the record is still one failed record.
    (second,) = (dead for at, dead in dead_letters(isolated_stack, 2).items() if at != where)
    assert second.original_offset == copy.offset() and second.original_object is not None
    listed = dlq(isolated_stack, "list", "--json")
    (row,) = listed.stdout.splitlines()
    assert json.loads(row)["replays"] == 1
    objects = spilled_objects(isolated_stack)
    assert len(objects) == 2

    again = dlq(isolated_stack, "replay", "--yes")
    assert again.returncode == 0, again.stderr
    assert "replayed 0 of 1 selected records, skipped 1" in again.stdout
    # Anything the second run published would come before this on alice's partition, and
    # the processor writes each letter before it reads on: once the sentinel's letter is
    # there, so is any other.
    produce(isolated_stack, b"alice", b"sentinel", [])
    letters = dead_letters(isolated_stack, 3)
    assert sorted(dead.value or b"" for dead in letters.values()) == [b"", b"", b"sentinel"]
    assert len(list(read_dlq(isolated_stack))) == 3
    assert spilled_objects(isolated_stack) == objects
    processor.assert_running()


def test_a_request_with_990_kb_of_headers_is_dead_lettered_whole(
    isolated_stack: Settings, processor: Service
) -> None:
    headers = [(f"x-pad-{n:03d}", bytes([n % 256]) * 1000) for n in range(990)]
    request = GenerationRequest.new(user_id="bob", prompt="a fox")
    value = json.dumps({**json.loads(request.model_dump_json()), "steps": 500}).encode()
    partition, offset = produce(isolated_stack, b"bob", value, headers)
    admitted_after(isolated_stack, "bob")
    processor.assert_running()

    ((where, sent),) = dead_letters(isolated_stack, 1).items()
    assert (sent.original_partition, sent.original_offset) == (partition, offset)
    assert sent.original_object is not None and sent.original_headers == []

    replayed = dlq(isolated_stack, "replay", "--yes")
    assert replayed.returncode == 0, replayed.stderr
    copy = republished(isolated_stack, offset, len(value))
    assert copy.value() == value
    assert copy.headers() == [*headers, (REPLAY_HEADER, sign(where, isolated_stack))]
