"""The render worker as a real process with the `tiny` model, against a real broker and S3
server: images, batching, crashes, an object-store outage, poison requests, SIGTERM."""

from __future__ import annotations

import functools
import hashlib
import io
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from confluent_kafka import TopicPartition
from PIL import Image

from imagegen.consumers.dlq import FailedRecords, Filters, replay
from imagegen.consumers.rendering import OnStep
from imagegen.consumers.storage import object_key
from imagegen.consumers.worker import RenderWorker, WorkerOptions
from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.schemas import (
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    Reason,
    Stage,
    Status,
    decode,
    encode,
)
from imagegen.schemas.errors import WorkerCrashed
from imagegen.schemas.topics import DLQ, RENDER, RESULTS, WORKER_GROUP
from tests.conftest import settings_env
from tests.helpers import read_topic, results_for, s3_client
from tests.processes import Service
from tests.proxy import Proxy

# Small and quick on a CPU: the pipeline code is real, the compute is cheap.
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def worker_factory(isolated_stack: Settings, tmp_path: Path) -> Iterator:
    started: list[Service] = []

    def start(
        *args: str, stack: Settings = isolated_stack, launcher: Path | None = None, **env: str
    ) -> Service:
        variables = {f"IMAGEGEN_{name.upper()}": value for name, value in env.items()}
        worker = Service(
            ["worker", "--device", "cpu", *args],
            {**settings_env(stack), **variables},
            tmp_path / f"worker-{len(started)}.log",
            launcher,
        )
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def submit(stack: Settings, requests: list[GenerationRequest], extra: list[bytes] = ()) -> None:
    """Put requests straight on imagegen.render, as the processor admits them."""
    producer = make_producer(stack)
    for request in requests:
        producer.produce(RENDER, key=request.kafka_key, value=encode(request))
    for value in extra:
        producer.produce(RENDER, key=requests[0].kafka_key, value=value)
    assert producer.flush(30) == 0


def small_requests(count: int, **fields: object) -> list[GenerationRequest]:
    return [
        GenerationRequest.new(
            user_id=f"user-{i % 5}", prompt=f"a lighthouse {i}", **SMALL, **fields
        )
        for i in range(count)
    ]


def test_images_are_stored_and_described_by_their_results(worker_factory, isolated_stack) -> None:
    requests = [
        GenerationRequest.new(user_id="ann", prompt="a red boat", width=64, height=96, steps=2),
        GenerationRequest.new(
            user_id="bob", prompt="a blue kite", output_format="jpeg", seed=7, **SMALL
        ),
        GenerationRequest.new(user_id="cy", prompt="a fern", output_format="webp", **SMALL),
    ]
    worker_factory()
    submit(isolated_stack, requests)
    found = results_for(isolated_stack, {r.request_id for r in requests})
    store = ObjectStore(isolated_stack)
    for request in requests:
        (result,) = found[request.request_id]
        assert result.status is Status.SUCCEEDED, result.detail
        assert result.object_key == object_key(request)
        data = store.get(result.object_key)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (result.size_bytes, result.sha256)
        image = Image.open(io.BytesIO(data))
        assert image.size == (request.width, request.height)
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[request.output_format]
        assert result.timings is not None and result.timings.render_ms is not None
        if request.seed is not None:
            assert result.seed == request.seed


def test_compatible_requests_share_one_forward_pass(worker_factory, isolated_stack) -> None:
    requests = small_requests(4)
    submit(isolated_stack, requests)  # all waiting before the worker starts
    worker = worker_factory("--max-batch", "4", "--max-wait-ms", "3000", "--cpu-threads", "1")
    found = results_for(isolated_stack, {r.request_id for r in requests})
    assert {found[r.request_id][0].batch_size for r in requests} == {4}
    assert "on cpu (torch.float32), 1 thread(s)" in worker.log.read_text()


def test_poison_requests_are_dead_lettered_without_holding_up_their_partition(
    worker_factory, isolated_stack
) -> None:
    # Same user, so the same partition: the good requests queue behind the bad ones.
    unknown = GenerationRequest.new(user_id="eve", prompt="x", model="no-such-model", **SMALL)
    good = [GenerationRequest.new(user_id="eve", prompt=f"ok {i}", **SMALL) for i in range(3)]
    submit(isolated_stack, [unknown], extra=[b"\xff not a request"])
    submit(isolated_stack, good)
    worker_factory()

    found = results_for(isolated_stack, {r.request_id for r in [unknown, *good]})
    assert all(found[r.request_id][0].status is Status.SUCCEEDED for r in good)
    (failed,) = found[unknown.request_id]
    assert (failed.status, failed.reason) == (Status.FAILED, Reason.UNKNOWN_MODEL)
    assert "--model no-such-model" in (failed.detail or "")

    letters = [
        DeadLetter.from_kafka(m.key(), m.value(), m.headers())
        for m in read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 2)
    ]
    assert {letter.stage for letter in letters} == {Stage.RENDER, Stage.VALIDATE}
    assert {letter.value for letter in letters} == {encode(unknown), b"\xff not a request"}


def test_an_object_store_outage_is_retried_and_loses_nothing(
    worker_factory, isolated_stack, tmp_path
) -> None:
    host, port = isolated_stack.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    through_proxy = isolated_stack.model_copy(update={"s3_endpoint": proxy.address})
    try:
        worker = worker_factory(stack=through_proxy, retry_base_delay_s="0.1")
        proxy.cut()
        requests = small_requests(6)
        submit(isolated_stack, requests)
        # The outage lasts until the worker has demonstrably hit it and backed off.
        wait_for_line(worker.log, "retrying in")
        proxy.restore()
        found = results_for(isolated_stack, {r.request_id for r in requests})
    finally:
        proxy.close()
    assert all(found[r.request_id][0].status is Status.SUCCEEDED for r in requests)


def test_sigkill_repeatedly_leaves_exactly_one_object_per_request(
    worker_factory, isolated_stack
) -> None:
    s3 = s3_client(isolated_stack)
    s3.put_bucket_versioning(
        Bucket=isolated_stack.s3_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    requests = small_requests(200)
    submit(isolated_stack, requests)
    everything = {r.request_id for r in requests}
    for round_ in range(1, 4):
        worker = worker_factory("--max-batch", "8")
        # Kill it mid-stream: once it has published some results, long before it has all.
        wait_for_results(isolated_stack, 30 * round_)
        worker.kill()
    worker_factory("--max-batch", "8")
    found = results_for(isolated_stack, everything, timeout_s=300)

    versions = s3.list_object_versions(Bucket=isolated_stack.s3_bucket).get("Versions", [])
    per_key: dict[str, int] = {}
    for version in versions:
        per_key[version["Key"]] = per_key.get(version["Key"], 0) + 1
    for request in requests:
        answers = found[request.request_id]
        assert any(a.status is Status.SUCCEEDED for a in answers)
        assert per_key[object_key(request)] == 1  # never a second version: never replaced
        assert len({a.sha256 for a in answers}) == 1


# A worker whose pipeline dies on one prompt as a process dies to the kernel's out-of-memory
# killer or a native crash: at once, with no exception to handle.
KILLING_LAUNCHER = """\
import os
import signal

from imagegen.consumers.rendering import Renderer

render = Renderer.render


def render_or_die(self, requests, on_step=None, inputs=None):
    if any(request.prompt == "kill the worker" for request in requests):
        os.kill(os.getpid(), signal.SIGKILL)
    return render(self, requests, on_step, inputs)


Renderer.render = render_or_die
from imagegen.cli.app import main
main()
"""


def test_a_request_that_kills_its_worker_is_dead_lettered_instead_of_crash_looping(
    worker_factory, isolated_stack, tmp_path
) -> None:
    launcher = tmp_path / "killing.py"
    launcher.write_text(KILLING_LAUNCHER)
    # One user, so one partition, and a wait long enough that all five render in one batch.
    poison = GenerationRequest.new(user_id="mallory", prompt="kill the worker", **SMALL)
    good = [GenerationRequest.new(user_id="mallory", prompt=f"fine {i}", **SMALL) for i in range(4)]
    submit(isolated_stack, [*good[:2], poison, *good[2:]])
    start = functools.partial(
        worker_factory, "--max-batch", "5", "--max-wait-ms", "30000", launcher=launcher
    )

    # As a supervisor restarts a worker that died. The first dies rendering the batch, which
    # makes all five suspects; the second renders each suspect alone, and dies with the
    # poison; the third fails the poison without rendering it (one death alone is the limit).
    for _ in range(2):
        assert start(max_attempts="1").process.wait(120) == -signal.SIGKILL
    survivor = start(max_attempts="1")
    found = results_for(isolated_stack, {r.request_id for r in [poison, *good]})
    survivor.assert_running()
    (message,) = read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 1)
    assert survivor.stop() == 0  # after which every delivery report has been handled

    assert all(found[r.request_id][0].status is Status.SUCCEEDED for r in good)
    # Rendered alone after the first death (None: published again from the store).
    assert all(a.batch_size in (1, None) for r in good for a in found[r.request_id])
    (failed,) = found[poison.request_id]
    assert (failed.status, failed.reason, failed.attempts) == (
        Status.FAILED,
        Reason.RENDER_ERROR,
        1,
    )
    assert "1 worker process(es) died while rendering this request alone" in (failed.detail or "")
    letter = DeadLetter.from_kafka(message.key(), message.value(), message.headers())
    assert (letter.stage, letter.value, letter.attempts) == (Stage.RENDER, encode(poison), 1)
    # Every mark is gone: removed after each render, and once the poison's dead letter was
    # acknowledged.
    assert not list((Path(isolated_stack.state_dir) / "worker" / "crashes").iterdir())


def test_sigterm_finishes_in_flight_work_and_commits_it(worker_factory, isolated_stack) -> None:
    requests = small_requests(60)
    submit(isolated_stack, requests)
    worker = worker_factory()
    wait_for_results(isolated_stack, 10)
    assert worker.stop() == 0
    assert "stopped;" in worker.log.read_text()

    # What was committed was finished: every request below its partition's committed
    # offset has its result.
    consumer = make_consumer(isolated_stack, group_id=WORKER_GROUP)
    committed = {
        tp.partition: tp.offset
        for tp in consumer.committed([TopicPartition(RENDER, p) for p in range(6)], timeout=10)
    }
    consumer.close()
    assert sum(max(offset, 0) for offset in committed.values()) > 0
    done = {
        decode(GenerationRequest, m.value()).request_id
        for m in read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= len(requests))
        if m.offset() < committed[m.partition()]
    }
    found = results_for(isolated_stack, done, timeout_s=30)
    assert all(found[request_id][0].status is Status.SUCCEEDED for request_id in done)


def test_sigterm_during_a_render_longer_than_the_poll_interval_still_commits(
    worker_factory, isolated_stack
) -> None:
    # The tests' 2 s session timeout is also the worker's max.poll.interval.ms; this render
    # takes several seconds, and the worker must stay in its group until it can commit.
    slow = GenerationRequest.new(
        user_id="user-slow", prompt="a slow lighthouse", width=256, height=256, steps=100
    )
    submit(isolated_stack, [slow])
    worker = worker_factory("--log-level", "debug")
    wait_for_line(worker.log, "rendering 1 request(s)")
    assert worker.stop() == 0

    (result, *_) = results_for(isolated_stack, {slow.request_id}, timeout_s=30)[slow.request_id]
    assert result.status is Status.SUCCEEDED
    assert result.timings.render_ms > 2500, "too fast to outlast the poll interval: add steps"
    consumer = make_consumer(isolated_stack, group_id=WORKER_GROUP)
    committed = consumer.committed([TopicPartition(RENDER, p) for p in range(6)], timeout=10)
    consumer.close()
    assert sum(max(tp.offset, 0) for tp in committed) == 1, worker.log.read_text()[-3000:]


def wait_for_results(stack: Settings, count: int) -> None:
    read_topic(stack, RESULTS, lambda ms: len(ms) >= count, timeout_s=120)


def wait_for_line(log: Path, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.1)  # a child's log file offers no notification


def test_a_request_failed_by_an_outage_succeeds_after_replay_and_renders_once(
    worker_factory, isolated_stack
) -> None:
    s3 = s3_client(isolated_stack)
    s3.put_bucket_versioning(
        Bucket=isolated_stack.s3_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    host, port = isolated_stack.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    through_proxy = isolated_stack.model_copy(update={"s3_endpoint": proxy.address})
    request = small_requests(1)[0]
    try:
        # No outage budget: the first unreachable store fails the request.
        worker_factory(stack=through_proxy, max_attempts="1", outage_budget_s="0")
        proxy.cut()
        submit(isolated_stack, [request])
        (failed,) = results_for(isolated_stack, {request.request_id})[request.request_id]
        assert (failed.status, failed.reason) == (Status.FAILED, Reason.STORE_ERROR)
        proxy.restore()
        # The letter and the result go out together, but a reader may see the result first.
        read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 1)

        failures = FailedRecords(isolated_stack, Filters(request_id=request.request_id))
        assert [failure.latest.letter.stage for failure in failures] == [Stage.STORE]
        replay(isolated_stack, failures)
        replay(isolated_stack, failures)  # the same record twice
        answers = [
            decode(GenerationResult, m.value())
            for m in read_topic(isolated_stack, RESULTS, lambda ms: len(ms) >= 3)
        ]
    finally:
        proxy.close()
    assert [a.status for a in answers] == [Status.FAILED, Status.SUCCEEDED, Status.SUCCEEDED]
    rendered = [a for a in answers if a.batch_size is not None]
    assert len(rendered) == 1  # the other replay found the stored image
    versions = s3.list_object_versions(Bucket=isolated_stack.s3_bucket).get("Versions", [])
    assert [v["Key"] for v in versions] == [object_key(request)]


class ImagelessRenderer:
    """Breaks the render thread's own logic (one image per request), not a render."""

    device = torch.device("cpu")

    def render(
        self,
        requests: list[GenerationRequest],
        on_step: OnStep | None = None,
        inputs: object = None,
    ) -> list[Image.Image]:
        return []


def test_a_crashed_render_thread_stops_the_worker_and_commits_nothing(isolated_stack) -> None:
    submit(isolated_stack, small_requests(1))
    worker = RenderWorker(isolated_stack, {"tiny": ImagelessRenderer()}, WorkerOptions())
    with pytest.raises(WorkerCrashed, match="render thread crashed"):
        worker.run()
    consumer = make_consumer(isolated_stack, WORKER_GROUP)
    partitions = [TopicPartition(RENDER, p) for p in range(6)]
    assert all(tp.offset < 0 for tp in consumer.committed(partitions, timeout=10))
    consumer.close()
