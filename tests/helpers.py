"""Helpers shared by the tests: free ports, the command line, S3, and reading topics back."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import boto3
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from imagegen.infra.kafka import make_consumer
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, decode
from imagegen.schemas.topics import RESULTS


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
