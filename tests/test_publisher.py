"""The publisher (requests and cancellations) and `imagegen submit` against the real broker."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import get_args

import pytest
from confluent_kafka import Message

from imagegen.cli.submit import PriorityChoice
from imagegen.infra.kafka import make_admin
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings, load_settings
from imagegen.producers import AsyncRequestPublisher, RequestPublisher
from imagegen.schemas import CancelRequest, GenerationRequest, Priority, decode, new_request_id
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage
from imagegen.schemas.topics import CANCELLATIONS, REQUESTS
from tests.helpers import free_port, imagegen, read_topic


def published(
    settings: Settings, request_ids: set[str]
) -> dict[str, tuple[bytes, GenerationRequest]]:
    """The records on imagegen.requests carrying `request_ids`, as (key, request)."""
    found: dict[str, tuple[bytes, GenerationRequest]] = {}
    scanned = 0

    def all_found(messages: list) -> bool:
        nonlocal scanned
        for message in messages[scanned:]:
            request = decode(GenerationRequest, message.value())
            if request.request_id in request_ids:
                found[request.request_id] = (message.key(), request)
        scanned = len(messages)
        return request_ids <= found.keys()

    read_topic(settings, REQUESTS, all_found)
    return found


def test_publish_fills_in_ids_and_keys_by_user(settings: Settings) -> None:
    with RequestPublisher(settings) as publisher:
        request_id = publisher.publish(user_id="carol", prompt="a red fox", steps=4)
    ((key, request),) = published(settings, {request_id}).values()
    assert key == b"carol"
    assert (request.prompt, request.steps, request.request_id) == ("a red fox", 4, request_id)


def test_async_publisher_delivers_many_in_flight(settings: Settings) -> None:
    async def publish_all() -> list[str]:
        async with AsyncRequestPublisher(settings) as publisher:
            return await asyncio.gather(
                *(publisher.publish(user_id=f"user-{i % 5}", prompt=f"p{i}") for i in range(50))
            )

    request_ids = asyncio.run(publish_all())
    assert len(set(request_ids)) == 50
    found = published(settings, set(request_ids))
    assert {key for key, _ in found.values()} == {f"user-{i}".encode() for i in range(5)}


def test_an_invalid_request_is_refused_before_any_network() -> None:
    nowhere = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with (
        RequestPublisher(nowhere, delivery_timeout_s=1) as publisher,
        pytest.raises(InvalidMessage, match="width: must be a multiple of 8"),
    ):
        publisher.publish(user_id="dave", prompt="x", width=100)


def test_an_unreachable_broker_times_out_with_advice() -> None:
    nowhere = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    publisher = RequestPublisher(nowhere, delivery_timeout_s=1)
    with pytest.raises(BrokerUnavailable, match="within 1s"):
        publisher.publish(user_id="erin", prompt="x")


def test_async_unreachable_broker_times_out() -> None:
    nowhere = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")

    async def attempt() -> None:
        async with AsyncRequestPublisher(nowhere, delivery_timeout_s=1) as publisher:
            await publisher.publish(user_id="erin", prompt="x")

    with pytest.raises(BrokerUnavailable):
        asyncio.run(attempt())


def test_submit_prints_the_request_id(settings: Settings) -> None:
    result = imagegen(
        settings,
        "submit",
        "a harbour at night",
        "--user",
        "frank",
        "--steps",
        "3",
        "--idempotency-key",
        "order-9",
        "--format",
        "webp",
    )
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.strip()
    ((_, request),) = published(settings, {request_id}).values()
    assert (request.idempotency_key, request.output_format, request.steps) == (
        "order-9",
        "webp",
        3,
    )


def test_submit_json_prints_the_request(settings: Settings) -> None:
    result = imagegen(settings, "submit", "a kite", "--user", "gina", "--seed", "7", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["user_id"], printed["seed"]) == ("gina", 7)


def test_submit_rejects_bad_input_by_field(settings: Settings) -> None:
    result = imagegen(settings, "submit", "x", "--user", "bad user", "--steps", "500")
    assert result.returncode == 2
    assert "user_id:" in result.stderr and "steps:" in result.stderr


def cancellations(settings: Settings, request_id: str) -> list[Message]:
    """The records on imagegen.cancellations naming `request_id`."""

    def found(messages: list[Message]) -> bool:
        return any(m.key() == request_id.encode() for m in messages)

    return [m for m in read_topic(settings, CANCELLATIONS, found) if m.key() == request_id.encode()]


def test_cancel_publishes_a_cancellation_keyed_by_request_id(settings: Settings) -> None:
    request_id = new_request_id()
    with RequestPublisher(settings) as publisher:
        sent = publisher.cancel(request_id, "carol")
    (message,) = cancellations(settings, request_id)
    assert decode(CancelRequest, message.value()) == sent
    assert (sent.request_id, sent.user_id) == (request_id, "carol")
    # Where the readers of cancellations look for it: murmur2 of the request id.
    count = len(make_admin(settings).list_topics(CANCELLATIONS).topics[CANCELLATIONS].partitions)
    assert message.partition() == partition_for(request_id.encode(), count)


def test_async_cancel_is_acknowledged_too(settings: Settings) -> None:
    request_id = new_request_id()

    async def cancel() -> CancelRequest:
        async with AsyncRequestPublisher(settings) as publisher:
            return await publisher.cancel(request_id, "dora")

    sent = asyncio.run(cancel())
    (message,) = cancellations(settings, request_id)
    assert decode(CancelRequest, message.value()) == sent


def test_a_cancellation_is_checked_and_acknowledged_like_a_request() -> None:
    nowhere = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    publisher = RequestPublisher(nowhere, delivery_timeout_s=1)
    with pytest.raises(InvalidMessage, match="request_id"):
        publisher.cancel("not an id", "erin")
    with pytest.raises(BrokerUnavailable, match="cancellation was not acknowledged"):
        publisher.cancel(new_request_id(), "erin")


def test_submit_sets_priority_and_a_deadline(settings: Settings) -> None:
    batch = imagegen(
        settings, "submit", "a moth", "-u", "hana", "--priority", "batch", "--ttl", "90"
    )
    assert batch.returncode == 0, batch.stderr
    at = "2031-05-01T12:00:00+02:00"
    dated = imagegen(settings, "submit", "a moth", "-u", "hana", "--expires-at", at)
    assert dated.returncode == 0, dated.stderr
    found = published(settings, {batch.stdout.strip(), dated.stdout.strip()})
    _, first = found[batch.stdout.strip()]
    assert first.priority == "batch"
    assert first.expires_at == first.submitted_at + timedelta(seconds=90)
    _, second = found[dated.stdout.strip()]
    assert second.priority == "interactive"
    assert second.expires_at == datetime.fromisoformat(at)


def test_submit_takes_one_deadline_and_known_priorities(settings: Settings) -> None:
    both = imagegen(
        settings, "submit", "x", "-u", "ivan", "--ttl", "5", "--expires-at", "2031-01-01"
    )
    assert both.returncode == 2
    assert "not both" in both.stderr
    unknown = imagegen(settings, "submit", "x", "-u", "ivan", "--priority", "urgent")
    assert unknown.returncode == 2
    assert "interactive" in unknown.stderr


def test_the_priority_choices_are_the_contracts() -> None:
    assert {choice.value for choice in PriorityChoice} == set(get_args(Priority))
