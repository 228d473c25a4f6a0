"""Helpers shared by the tests: free ports, the command line, S3, and writing records onto
topics and reading them back."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable

import boto3
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.settings import Settings
from imagegen.schemas import (
    CancelRequest,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    decode,
    encode,
)
from imagegen.schemas.topics import EVENTS, RESULTS

#: What tests write onto topics themselves, in the pipeline's stead.
Record = GenerationRequest | CancelRequest | JobEvent | GenerationResult


def imagegen(stack: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`imagegen <args>` pointed at `stack`, as a user runs it."""
    from tests.conftest import settings_env  # conftest imports this module

    return subprocess.run(
        [sys.executable, "-m", "imagegen", *args],
        env=settings_env(stack),
        capture_output=True,
        text=True,
        timeout=300,
    )


def s3_client(stack: Settings):  # boto3 ships no type hints
    """A plain S3 client of `stack`'s object store, to change it behind the pipeline's back."""
    return boto3.client(
        "s3",
        endpoint_url=f"http://{stack.s3_endpoint}",
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key.get_secret_value(),
        region_name=stack.s3_region,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def produce(stack: Settings, topic: str, records: Iterable[Record]) -> None:
    """Write `records` onto `topic`, keyed as the pipeline keys them, and wait until the
    broker has them all: a test that writes in the pipeline's stead (a processor that
    admits, a user who cancels) then reads what follows from a known start."""
    producer = make_producer(stack)
    for record in records:
        producer.produce(topic, key=record.kafka_key, value=encode(record))
    assert producer.flush(30) == 0


def read_topic(
    settings: Settings,
    topic: str,
    until: Callable[[list[Message]], bool],
    timeout_s: float = 30.0,
) -> list[Message]:
    """Read `topic` from the start of every partition until `until(messages)` holds.

    Each poll blocks on the broker for the next record; nothing sleeps.
    """
    consumer = make_consumer(settings, group_id=f"test-reader-{uuid.uuid4()}")
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: condition not met after {len(messages)} records")
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                messages.append(message)
    finally:
        consumer.close()
    return messages


def results_for(
    settings: Settings, expected: set[str], timeout_s: float = 120
) -> dict[str, list[GenerationResult]]:
    """Every result on imagegen.results by request id, read until each of `expected` has one."""
    found: dict[str, list[GenerationResult]] = {}
    scanned = 0

    def answered(messages: list[Message]) -> bool:
        nonlocal scanned
        for message in messages[scanned:]:
            result = decode(GenerationResult, message.value())
            found.setdefault(result.request_id, []).append(result)
        scanned = len(messages)
        return expected <= found.keys()

    read_topic(settings, RESULTS, answered, timeout_s)
    return found


def events_until(
    settings: Settings,
    until: Callable[[dict[str, list[JobEvent]]], bool],
    timeout_s: float = 120,
) -> dict[str, list[JobEvent]]:
    """Every event on imagegen.events by request id, in order, read until `until` holds."""
    found: dict[str, list[JobEvent]] = {}
    scanned = 0

    def enough(messages: list[Message]) -> bool:
        nonlocal scanned
        for message in messages[scanned:]:
            event = decode(JobEvent, message.value())
            found.setdefault(event.request_id, []).append(event)
        scanned = len(messages)
        return until(found)

    read_topic(settings, EVENTS, enough, timeout_s)
    return found
