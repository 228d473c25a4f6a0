"""The publisher and `imagegen submit` against the real broker."""

from __future__ import annotations

import asyncio
import json

import pytest

from imagegen.infra.settings import Settings, load_settings
from imagegen.producers import AsyncRequestPublisher, RequestPublisher
from imagegen.schemas import GenerationRequest, decode
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage
from imagegen.schemas.topics import REQUESTS
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
