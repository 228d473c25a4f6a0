"""A render worker against hostile records and a failure path that fails: a forged header,
a dead letter that cannot be written, a job that cannot end, a batch out of memory, and
broker errors that waiting does not fix. The worker either carries on or stops saying why,
and never holds a record's partition silently."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, Message

from imagegen.consumers.broker_errors import stops_the_worker, what_to_fix
from imagegen.consumers.crashes import CrashLedger
from imagegen.consumers.jobs import Job, Polled, now_ms
from imagegen.consumers.lifecycle import Lifecycle
from imagegen.consumers.models import load_pipeline
from imagegen.consumers.pipeline import RenderPipeline
from imagegen.consumers.rendering import Renderer
from imagegen.consumers.retry import RetryPolicy
from imagegen.consumers.worker import RenderWorker, WorkerOptions
from imagegen.infra.kafka import make_producer
from imagegen.infra.settings import Settings
from imagegen.infra.tracing import start_span
from imagegen.schemas import DeadLetter, GenerationRequest, Stage, Status, encode
from imagegen.schemas.headers import ADMITTED_AT_HEADER
from imagegen.schemas.topics import DLQ, RENDER
from tests import test_worker
from tests.helpers import read_topic, results_for
from tests.test_worker import SMALL, submit

TIMEOUT_S = 60

worker_factory = test_worker.worker_factory  # the fixture, shared


def test_a_forged_admission_header_is_ignored_and_the_partition_carries_on(
    worker_factory, isolated_stack: Settings
) -> None:
    # One user, so one partition: the ordinary requests queue behind the forged ones.
    forged = {
        value: GenerationRequest.new(user_id="mallory", prompt=f"forged {i}", **SMALL)
        for i, value in enumerate([b"x", b"-5", b"1e12", b"9" * 5000, b"\xff\xfe", b""])
    }
    ordinary = [
        GenerationRequest.new(user_id="mallory", prompt=f"ordinary {i}", **SMALL) for i in range(3)
    ]
    producer = make_producer(isolated_stack)
    for value, request in forged.items():
        producer.produce(
            RENDER,
            key=request.kafka_key,
            value=encode(request),
            headers=[(ADMITTED_AT_HEADER, value), (ADMITTED_AT_HEADER, None)],
        )
    assert producer.flush(30) == 0
    submit(isolated_stack, ordinary)
    worker = worker_factory()

    everyone = [*forged.values(), *ordinary]
    found = results_for(isolated_stack, {r.request_id for r in everyone})
    worker.assert_running()
    for request in everyone:
        (result,) = found[request.request_id]
        assert result.status is Status.SUCCEEDED, result.detail
        assert result.timings is not None and result.timings.queue_ms is not None
    assert f"ignoring the {ADMITTED_AT_HEADER} header" in worker.log.read_text()


# The worker's producer takes records of at most 3,000 bytes: a request's result fits, the
# dead letter of a request with long prompts does not, and produce() raises for it.
SMALL_RECORDS_LAUNCHER = """\
import functools

from imagegen.consumers import clients

clients.make_producer = functools.partial(clients.make_producer, **{"message.max.bytes": 3000})
from imagegen.cli.app import main
main()
"""


def test_a_dead_letter_that_cannot_be_written_stops_the_worker_and_is_read_again(
    worker_factory, isolated_stack: Settings, tmp_path: Path
) -> None:
    launcher = tmp_path / "small_records.py"
    launcher.write_text(SMALL_RECORDS_LAUNCHER)
    before = GenerationRequest.new(user_id="zoe", prompt="before", **SMALL)
    doomed = GenerationRequest.new(
        user_id="zoe",
        prompt="p" * 2000,
        negative_prompt="n" * 2000,
        model="no-such-model",
        **SMALL,
    )
    after = GenerationRequest.new(user_id="zoe", prompt="after", **SMALL)
    submit(isolated_stack, [before, doomed, after])

    small = worker_factory(launcher=launcher, max_attempts="2", retry_base_delay_s="0.05")
    assert small.process.wait(TIMEOUT_S * 2) == 2, small.log.read_text()[-3000:]
    log = small.log.read_text()
    assert "Cannot write a" in log and "record to imagegen.dlq" in log
    assert "after 2 attempt(s) (IMAGEGEN_MAX_ATTEMPTS): MSG_SIZE_TOO_LARGE" in log
    assert "raise the topic's max.message.bytes" in log
    assert "The worker stopped; its unfinished requests stay uncommitted" in log

    # The next worker reads the record again, and its dead letter is written this time.
    worker_factory()
    found = results_for(isolated_stack, {r.request_id for r in [before, doomed, after]})
    assert all(found[r.request_id][0].status is Status.SUCCEEDED for r in (before, after))
    assert {result.status for result in found[doomed.request_id]} == {Status.FAILED}
    (message,) = read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 1)
    letter = DeadLetter.from_kafka(message.key(), message.value(), message.headers())
    assert (letter.stage, letter.value) == (Stage.RENDER, encode(doomed))


class Unanswerable:
    """Outcomes whose failed result cannot be built: the failure path itself fails."""

    def failed(self, job: Job, error: BaseException, stage: Stage, attempts: int) -> None:
        raise RuntimeError("the failed result could not be built")


def test_a_job_whose_failure_cannot_be_told_stops_the_worker(tmp_path: Path) -> None:
    crashed: list[tuple[str, BaseException | None]] = []
    told = threading.Event()

    def on_crash() -> None:
        crashed.append((threading.current_thread().name, sys.exc_info()[1]))
        told.set()

    stopping = threading.Event()
    pipeline = RenderPipeline(
        {},
        store=None,  # type: ignore[arg-type] # an unknown model fails before the lookup
        crashes=CrashLedger(tmp_path),
        outcomes=Unanswerable(),  # type: ignore[arg-type]
        policy=RetryPolicy(1, 0.01, 0),
        max_batch=1,
        max_wait_s=0,
        check_threads=1,
        finish_threads=1,
        stopping=stopping,
        is_current=lambda job: True,
        lifecycle=Lifecycle(),
    )
    pipeline.start(on_crash=on_crash)
    pipeline.submit(_job(GenerationRequest.new(user_id="ann", prompt="p", model="nope", **SMALL)))
    assert told.wait(TIMEOUT_S)
    stopping.set()
    pipeline.drain()
    ((thread, error),) = crashed
    assert thread.startswith("check")
    assert str(error) == "the failed result could not be built"


def _job(request: GenerationRequest) -> Job:
    polled = Polled(RENDER, 0, 0, 0)
    message = Message(
        topic=RENDER,
        partition=0,
        offset=0,
        key=request.kafka_key,
        value=encode(request),
        timestamp=(TIMESTAMP_CREATE_TIME, now_ms()),
    )
    return Job(message, polled, request, now_ms(), start_span("test", []))


@pytest.fixture
def renderer_that_fits(tmp_path: Path) -> Iterator[tuple[Renderer, list[int]]]:
    """The real tiny pipeline, whose UNet runs out of memory for batches of more than two
    requests, as a device does; and the batch sizes it was called with, in requests."""
    pipeline = load_pipeline("tiny", torch.device("cpu"), torch.float32, tmp_path / "models")
    sizes: list[int] = []

    def out_of_memory_above_two(_module: object, args: tuple[torch.Tensor, ...]) -> None:
        requests = args[0].shape[0] // 2  # classifier-free guidance doubles the batch
        sizes.append(requests)
        if requests > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = pipeline.unet.register_forward_pre_hook(out_of_memory_above_two)
    yield Renderer(pipeline, torch.device("cpu")), sizes
    handle.remove()


def test_a_batch_out_of_memory_is_split_until_it_fits(
    isolated_stack: Settings, renderer_that_fits: tuple[Renderer, list[int]]
) -> None:
    renderer, sizes = renderer_that_fits
    requests = [
        GenerationRequest.new(user_id=f"user-{i}", prompt=f"a fern {i}", **SMALL) for i in range(4)
    ]
    submit(isolated_stack, requests)  # all waiting before the worker starts
    worker = RenderWorker(
        isolated_stack, {"tiny": renderer}, WorkerOptions(max_batch=4, max_wait_ms=30_000)
    )
    found: dict[str, list] = {}

    def stop_once_answered() -> None:
        try:
            found.update(results_for(isolated_stack, {r.request_id for r in requests}))
        finally:
            worker.stop()

    waiter = threading.Thread(target=stop_once_answered)
    waiter.start()
    worker.run()  # in the main thread, which signal handlers need
    waiter.join()

    for request in requests:
        (result,) = found[request.request_id]
        assert result.status is Status.SUCCEEDED, result.detail
        assert result.batch_size == 2
    assert sizes[0] == 4  # the batch of four ran out of memory before any request failed
    assert sorted(set(sizes[1:])) == [2]  # its halves fitted, every step


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError._FATAL, "Fatal error: producer fenced", fatal=True),
        KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED),
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED),
        KafkaError(KafkaError.FENCED_INSTANCE_ID),
    ],
)
def test_errors_that_waiting_does_not_fix_stop_the_worker(error: KafkaError) -> None:
    assert stops_the_worker(error)


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_COORDINATOR,
        KafkaError._MAX_POLL_EXCEEDED,
    ],
)
def test_errors_that_waiting_fixes_are_ridden_out(code: int) -> None:
    assert not stops_the_worker(KafkaError(code))


def test_the_message_says_what_to_fix() -> None:
    refused = what_to_fix(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "Broker: denied"))
    assert refused.startswith("GROUP_AUTHORIZATION_FAILED: Broker: denied.")
    assert "on groups imagegen-workers and imagegen-workers-batch" in refused
    assert "check the ACLs" in refused and "IMAGEGEN_KAFKA_SASL_USERNAME" in refused
    credentials = what_to_fix(KafkaError(KafkaError._AUTHENTICATION))
    assert "IMAGEGEN_KAFKA_SASL_PASSWORD" in credentials
    assert "Restart the worker" in what_to_fix(KafkaError(KafkaError._FATAL, fatal=True))
