"""`imagegen fetch` and `imagegen results` show each request's latest result, and fetch reads
only the partition its request id hashes to; on the real broker and object store, and at
the end through the whole pipeline: a store failure, a DLQ replay, then fetch."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer
from PIL import Image

from imagegen.consumers.results import ResultSubscriber
from imagegen.infra.kafka import make_admin, make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, Reason, Status, encode, new_request_id
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import RESULTS
from tests.conftest import settings_env
from tests.helpers import imagegen, s3_client
from tests.processes import Service


def failed(user: str) -> GenerationResult:
    return GenerationResult(
        request_id=new_request_id(),
        user_id=user,
        status=Status.FAILED,
        reason=Reason.PUBLISH_ERROR,
        detail="imagegen.render did not acknowledge the request",
        completed_at=utc_now(),
    )


def stored_image(settings: Settings, result: GenerationResult) -> tuple[GenerationResult, bytes]:
    """A succeeded result for `result`'s request, its image really in the object store."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buffer, format="PNG")
    data = buffer.getvalue()
    key = f"images/user={result.user_id}/{result.request_id}.png"
    assert ObjectStore(settings).put_if_absent(key, data, "image/png")
    succeeded = GenerationResult(
        request_id=result.request_id,
        user_id=result.user_id,
        status=Status.SUCCEEDED,
        bucket=settings.s3_bucket,
        object_key=key,
        content_type="image/png",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        completed_at=utc_now(),
    )
    return succeeded, data


def publish_as_the_processor(settings: Settings, result: GenerationResult) -> None:
    """Through aiokafka with its default partitioner, as faust sends the processor's results."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(RESULTS, encode(result), key=result.kafka_key)
        finally:
            await producer.stop()

    asyncio.run(send())


def publish_as_the_worker(
    settings: Settings, result: GenerationResult, partition: int | None = None
) -> None:
    """Through `make_producer`, as the worker sends results; `partition` overrides the
    partitioner, as a misconfigured producer would."""
    producer = make_producer(settings)
    placement = {} if partition is None else {"partition": partition}
    producer.produce(RESULTS, key=result.kafka_key, value=encode(result), **placement)
    assert producer.flush(10) == 0


def a_user() -> str:
    return f"fetch-{uuid.uuid4().hex[:12]}"


def test_a_request_that_succeeded_after_failing_is_fetchable(
    settings: Settings, tmp_path: Path
) -> None:
    first = failed(a_user())
    publish_as_the_processor(settings, first)
    image = tmp_path / "image.png"

    refused = imagegen(settings, "fetch", first.request_id, "-o", str(image))
    assert refused.returncode == 1, refused.stderr + refused.stdout
    assert "publish_error" in refused.stdout
    assert f"imagegen dlq replay --request-id {first.request_id}" in refused.stdout

    replayed, data = stored_image(settings, first)
    publish_as_the_worker(settings, replayed)
    fetched = imagegen(settings, "fetch", first.request_id, "-o", str(image))
    assert fetched.returncode == 0, fetched.stderr + fetched.stdout
    assert image.read_bytes() == data


def test_results_lists_each_request_once_with_its_latest_result(settings: Settings) -> None:
    first = failed(a_user())
    publish_as_the_processor(settings, first)
    replayed, _ = stored_image(settings, first)
    publish_as_the_worker(settings, replayed)

    listed = imagegen(settings, "results", "--user", first.user_id, "--json")
    assert listed.returncode == 0, listed.stderr + listed.stdout
    shown = [GenerationResult.model_validate_json(line) for line in listed.stdout.splitlines()]
    assert shown == [replayed]


def test_fetch_never_reads_a_partition_the_request_id_does_not_hash_to(
    settings: Settings, tmp_path: Path
) -> None:
    elsewhere, _ = stored_image(settings, failed(a_user()))
    metadata = make_admin(settings).list_topics(RESULTS, timeout=10)
    partitions = len(metadata.topics[RESULTS].partitions)
    home = partition_for(elsewhere.kafka_key, partitions)
    publish_as_the_worker(settings, elsewhere, partition=(home + 1) % partitions)

    fetched = imagegen(settings, "fetch", elsewhere.request_id, "-o", str(tmp_path / "x.png"))
    assert fetched.returncode == 2, fetched.stderr + fetched.stdout
    assert f"no result for {elsewhere.request_id}" in fetched.stderr
    assert not (tmp_path / "x.png").exists()


def test_fetch_refuses_what_is_not_a_request_id(settings: Settings, tmp_path: Path) -> None:
    fetched = imagegen(settings, "fetch", "../../etc/passwd", "-o", str(tmp_path / "x.png"))
    assert fetched.returncode == 2
    assert "is not a request id" in fetched.stderr


def remove_bucket(stack: Settings) -> None:
    s3 = s3_client(stack)
    for item in s3.list_objects_v2(Bucket=stack.s3_bucket).get("Contents", []):
        s3.delete_object(Bucket=stack.s3_bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=stack.s3_bucket)


def test_a_store_failure_replayed_from_the_dlq_is_then_fetchable(
    isolated_stack: Settings, tmp_path: Path
) -> None:
    # One attempt and no outage budget: the missing bucket fails the request at once.
    env = {
        **settings_env(isolated_stack),
        "IMAGEGEN_MAX_ATTEMPTS": "1",
        "IMAGEGEN_OUTAGE_BUDGET_S": "0",
    }
    services = [
        Service(["processor"], env, tmp_path / "processor.log"),
        Service(["worker", "--device", "cpu"], env, tmp_path / "worker.log"),
    ]
    for service in services:
        service.start()
    small = ("--width", "64", "--height", "64", "--steps", "2", "--timeout", "240")
    try:
        warm = imagegen(isolated_stack, "submit", "warm up", "--user", "ann", *small, "--wait")
        assert warm.returncode == 0, warm.stderr + warm.stdout  # both services are up

        remove_bucket(isolated_stack)
        submitted = imagegen(
            isolated_stack, "submit", "a lighthouse", "--user", "ann", *small, "--wait", "--json"
        )
        assert submitted.returncode == 1, submitted.stderr + submitted.stdout
        first = json.loads(submitted.stdout)
        assert (first["status"], first["reason"]) == ("failed", "store_error")
        request_id = first["request_id"]

        assert ObjectStore(isolated_stack).ensure_bucket()
        with ResultSubscriber(isolated_stack, request_ids=[request_id]) as results:
            replay = ("dlq", "replay", "--request-id", request_id, "--yes")
            replayed = imagegen(isolated_stack, *replay)
            assert replayed.returncode == 0, replayed.stderr + replayed.stdout
            answer = results.wait_for([request_id], timeout_s=240)[request_id]
        assert answer.status is Status.SUCCEEDED, answer

        image = tmp_path / "lighthouse.png"
        fetched = imagegen(isolated_stack, "fetch", request_id, "-o", str(image))
        assert fetched.returncode == 0, fetched.stderr + fetched.stdout
        assert Image.open(image).size == (64, 64)
    finally:
        for service in services:
            service.stop()
