"""Waiting for results on the real broker, and the whole pipeline answering `submit --wait`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image

from imagegen.consumers.results import ResultSubscriber, ResultTimeout
from imagegen.infra.kafka import make_admin, make_producer
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, Reason, Status, encode, new_request_id
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import RESULTS
from tests.conftest import settings_env
from tests.helpers import imagegen
from tests.processes import Service


def rejected(user: str = "ann") -> GenerationResult:
    return GenerationResult(
        request_id=new_request_id(),
        user_id=user,
        status=Status.REJECTED,
        reason=Reason.RATE_LIMITED,
        retry_after_ms=10,
        completed_at=utc_now(),
    )


def partitions_of(settings: Settings, topic: str) -> int:
    admin = make_admin(settings)
    return len(admin.list_topics(topic, timeout=10).topics[topic].partitions)


def publish(settings: Settings, *results: GenerationResult) -> None:
    producer = make_producer(settings)
    for result in results:
        producer.produce(RESULTS, key=result.kafka_key, value=encode(result))
    assert producer.flush(10) == 0


def test_wait_for_returns_each_awaited_requests_result(settings: Settings) -> None:
    first, second, other = rejected(), rejected(), rejected()
    with ResultSubscriber(settings) as subscriber:
        publish(settings, other, first, first, second)  # `first` delivered twice
        found = subscriber.wait_for([first.request_id, second.request_id], timeout_s=30)
    assert found == {first.request_id: first, second.request_id: second}


def test_wait_for_returns_the_latest_result_not_the_first(settings: Settings) -> None:
    failed = rejected()
    again = failed.model_copy(update={"reason": Reason.INVALID_REQUEST, "retry_after_ms": None})
    publish(settings, failed, again)
    arrived: list[GenerationResult] = []
    with ResultSubscriber(
        settings, start="beginning", request_ids=[failed.request_id]
    ) as subscriber:
        found = subscriber.wait_for([failed.request_id], timeout_s=30, on_result=arrived.append)
    assert found == {failed.request_id: again}
    assert arrived == [failed]  # the progress callback sees a request once, when first answered


def test_a_subscriber_for_some_requests_reads_only_their_partitions(settings: Settings) -> None:
    wanted, *others = [rejected(user="one-partition") for _ in range(24)]
    count = partitions_of(settings, RESULTS)
    home = partition_for(wanted.kafka_key, count)
    elsewhere = {r.request_id for r in others if partition_for(r.kafka_key, count) != home}
    assert elsewhere, "all 24 ids hashed to one partition: add more"
    publish(settings, wanted, *others)
    with ResultSubscriber(
        settings, start="beginning", request_ids=[wanted.request_id]
    ) as subscriber:
        seen = {result.request_id for result in subscriber.until_caught_up()}
    assert wanted.request_id in seen
    assert not seen & elsewhere


def test_wait_for_names_the_requests_still_missing(settings: Settings) -> None:
    answered, missing = rejected(), new_request_id()
    with ResultSubscriber(settings) as subscriber:
        publish(settings, answered)
        with pytest.raises(ResultTimeout, match="imagegen worker") as caught:
            subscriber.wait_for([answered.request_id, missing], timeout_s=3)
    assert caught.value.missing == [missing]
    assert caught.value.found == {answered.request_id: answered}


def test_the_asyncio_form_waits_too(settings: Settings) -> None:
    result = rejected()

    async def scenario() -> dict[str, GenerationResult]:
        with ResultSubscriber(settings) as subscriber:
            waiting = asyncio.create_task(subscriber.wait_for_async([result.request_id], 30))
            publish(settings, result)
            return await waiting

    assert asyncio.run(scenario()) == {result.request_id: result}


def test_reading_from_the_beginning_stops_when_caught_up(settings: Settings) -> None:
    earlier = rejected(user="early-bird")
    publish(settings, earlier)
    with ResultSubscriber(settings, start="beginning") as subscriber:
        seen = [result.request_id for result in subscriber.until_caught_up()]
    assert earlier.request_id in seen


def test_submit_wait_gets_an_image_through_the_whole_pipeline(
    isolated_stack: Settings, tmp_path: Path
) -> None:
    env = settings_env(isolated_stack)
    services = [
        Service(["processor"], env, tmp_path / "processor.log"),
        Service(["worker", "--device", "cpu"], env, tmp_path / "worker.log"),
    ]
    for service in services:
        service.start()
    try:
        done = imagegen(
            isolated_stack,
            *("submit", "a small boat", "--user", "ann", "--width", "64", "--height", "64"),
            *("--steps", "2", "--wait", "--json", "--timeout", "240"),
        )
        assert done.returncode == 0, done.stderr + done.stdout
        result = json.loads(done.stdout)
        assert result["status"] == "succeeded"
        assert result["url"].startswith("http://")

        image = tmp_path / "out" / "boat.png"
        fetched = imagegen(isolated_stack, "fetch", result["request_id"], "-o", str(image))
        assert fetched.returncode == 0, fetched.stderr + fetched.stdout
        assert Image.open(image).size == (64, 64)

        listed = imagegen(isolated_stack, "results", "--user", "ann")
        assert result["request_id"] in listed.stdout
    finally:
        for service in services:
            service.stop()
