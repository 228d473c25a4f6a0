"""The webhook deliverer against the real broker and object store, with real receivers.

Events are written to imagegen.events as the processor and the worker write them (the end
to end path, through the gateway, is in tests/test_gateway_webhooks.py), and the deliverer
runs in a thread of the test, as `imagegen webhooks` runs it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from imagegen.gateway.job_store import JobStore
from imagegen.infra.kafka import make_consumer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings
from imagegen.infra.webhook_secret_book import WebhookSecretBook
from imagegen.producers.webhook_secrets import WebhookSecretRegistry
from imagegen.schemas import (
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    Reason,
    Status,
)
from imagegen.schemas.events import EventType
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import DLQ, EVENTS, WEBHOOK_GROUP, WEBHOOK_RETRIES
from imagegen.webhooks import WebhookVerificationError, verify
from imagegen.webhooks.attempts import Attempts
from imagegen.webhooks.deliverer import WebhookDeliverer
from imagegen.webhooks.sender import WebhookSender
from tests.conftest import settings_env
from tests.helpers import imagegen, produce, read_topic
from tests.processes import Service
from tests.receivers import Receiver

EVENT_PARTITIONS = 6
#: Quick retries, so that a test sees several; the budget is the test's own.
QUICK = {"webhook_allow_private": True, "webhook_first_retry_s": 0.2}


@contextmanager
def running_deliverer(settings: Settings, **overrides: Any) -> Iterator[WebhookDeliverer]:
    configured = settings.model_copy(update={**QUICK, **overrides})
    store = ObjectStore(configured)
    sender = WebhookSender(configured)
    with WebhookSecretBook(configured) as secrets:
        deliverer = WebhookDeliverer(
            configured, Attempts(configured, secrets, JobStore(store), sender), store
        )
        thread = threading.Thread(target=deliverer.run, daemon=True)
        thread.start()
        try:
            yield deliverer
        finally:
            deliverer.stop()
            thread.join(timeout=60)
            sender.close()
    assert not thread.is_alive(), "the deliverer did not stop"


def _user() -> str:
    return f"hook-{uuid.uuid4().hex[:10]}"


def _secret(settings: Settings, user: str) -> str:
    with WebhookSecretBook(settings) as book:
        return WebhookSecretRegistry(settings).current(user, book).secret


def _request(user: str, url: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest.new(
        user_id=user, prompt="a lighthouse", width=64, height=64, steps=2, webhook_url=url, **fields
    )


def _succeeded(request: GenerationRequest, bucket: str) -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id,
        user_id=request.user_id,
        status=Status.SUCCEEDED,
        bucket=bucket,
        object_key=f"images/{request.request_id}.png",
        content_type="image/png",
        size_bytes=3,
        sha256=hashlib.sha256(b"png").hexdigest(),
        seed=7,
        completed_at=utc_now(),
    )


def _succeeded_event(settings: Settings, request: GenerationRequest) -> JobEvent:
    return _finished(request, _succeeded(request, settings.s3_bucket))


def _finished(request: GenerationRequest, result: GenerationResult) -> JobEvent:
    return JobEvent(
        request_id=request.request_id,
        user_id=request.user_id,
        type=EventType.FINISHED,
        at=utc_now(),
        status=result.status,
        request=request,
        result=result,
    )


def _dead_letters_of(settings: Settings, request_id: str, count: int = 1) -> list[DeadLetter]:
    def letters(messages: list[Any]) -> list[DeadLetter]:
        found = [DeadLetter.from_kafka(m.key(), m.value(), m.headers()) for m in messages]
        return [
            letter
            for letter in found
            if letter.stage.value == "webhook"
            and letter.value is not None
            and json.loads(letter.value).get("request_id") == request_id
        ]

    messages = read_topic(settings, DLQ, lambda got: len(letters(got)) >= count, timeout_s=90)
    return letters(messages)


def test_a_delivery_is_signed_and_carries_the_job_document(settings: Settings) -> None:
    user = _user()
    secret = _secret(settings, user)
    with Receiver() as receiver, running_deliverer(settings):
        request = _request(user, receiver.url)
        produce(settings, EVENTS, [_succeeded_event(settings, request)])
        (delivery,) = receiver.wait_for(1)
    job = verify(delivery.body, delivery.headers, secret)
    assert job["id"] == request.request_id and job["status"] == "succeeded"
    assert job["request"]["prompt"] == "a lighthouse"
    assert job["result"]["sha256"] == hashlib.sha256(b"png").hexdigest()
    assert job["result"]["url"].startswith("http")
    assert delivery.headers["webhook-id"].startswith("msg_")
    assert delivery.headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):
        verify(delivery.body, delivery.headers, _secret(settings, _user()))
    with pytest.raises(WebhookVerificationError):
        verify(delivery.body.replace(b"succeeded", b"failed"), delivery.headers, secret)
    forged = {**delivery.headers, "webhook-signature": "v1," + "A" * 44}
    with pytest.raises(WebhookVerificationError):
        verify(delivery.body, forged, secret)


def test_a_failing_receiver_gets_the_same_webhook_id_until_it_answers(settings: Settings) -> None:
    user = _user()
    secret = _secret(settings, user)
    with Receiver(lambda n: "fail" if n < 3 else "ok") as receiver, running_deliverer(settings):
        request = _request(user, receiver.url)
        produce(settings, EVENTS, [_succeeded_event(settings, request)])
        deliveries = receiver.wait_for(3)
    assert [d.answer for d in deliveries] == ["fail", "fail", "ok"]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1
    for delivery in deliveries:
        assert verify(delivery.body, delivery.headers, secret)["id"] == request.request_id


def test_a_hanging_receiver_delays_neither_another_user_nor_its_partition(
    settings: Settings,
) -> None:
    slow_user, quick_user = _user(), _user()
    for user in (slow_user, quick_user):
        _secret(settings, user)
    with (
        Receiver(lambda _: "hang") as hanging,
        Receiver() as quick,
        running_deliverer(settings, webhook_read_timeout_s=120),
    ):
        slow = _request(slow_user, hanging.url)
        behind = _same_partition_as(slow, lambda: _request(quick_user, quick.url))
        # One partition, the hanging receiver's job first: the quick one is behind it.
        produce(
            settings,
            EVENTS,
            [
                _succeeded_event(settings, slow),
                _succeeded_event(settings, behind),
            ],
        )
        hanging.wait_for(1)
        (delivered,) = quick.wait_for(1)
        assert json.loads(delivered.body)["id"] == behind.request_id
        assert len(hanging.received()) == 1, "the hanging attempt is still the first one"
        hanging.release()


def test_out_of_budget_it_is_dead_lettered_and_a_replay_delivers_it(settings: Settings) -> None:
    user = _user()
    secret = _secret(settings, user)
    with Receiver(lambda _: "fail") as receiver:
        request = _request(user, receiver.url)
        with running_deliverer(settings, webhook_retry_s=1.0):
            produce(settings, EVENTS, [_succeeded_event(settings, request)])
            (letter,) = _dead_letters_of(settings, request.request_id)
        failed = receiver.received()
        assert len(failed) >= 2 and all(d.answer == "fail" for d in failed)
        assert "not delivered after" in letter.error_message
        assert "503" in letter.error_message and "s3cret" not in letter.error_message

        receiver.set_answer(lambda _: "ok")
        with running_deliverer(settings, webhook_retry_s=1.0):
            replay = imagegen(
                settings,
                "dlq",
                "replay",
                "--stage",
                "webhook",
                "--request-id",
                request.request_id,
                "--yes",
            )
            assert replay.returncode == 0, replay.stderr
            delivered = receiver.wait_for(len(failed) + 1)[-1]
    assert delivered.answer == "ok"
    assert delivered.headers["webhook-id"] == failed[0].headers["webhook-id"]
    assert verify(delivered.body, delivered.headers, secret)["id"] == request.request_id


def test_a_url_that_resolves_to_a_private_address_is_refused(settings: Settings) -> None:
    user = _user()
    _secret(settings, user)
    with Receiver() as receiver, running_deliverer(settings, webhook_allow_private=False):
        request = _request(user, receiver.url.replace("http://", "https://"))
        produce(settings, EVENTS, [_succeeded_event(settings, request)])
        (letter,) = _dead_letters_of(settings, request.request_id)
    assert "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE" in letter.error_message
    assert receiver.received() == []


def test_a_failed_job_and_a_status_event_are_delivered_too(settings: Settings) -> None:
    user = _user()
    secret = _secret(settings, user)
    with Receiver() as receiver, running_deliverer(settings):
        request = _request(user, receiver.url, webhook_events=["status", "completed"])
        queued = JobEvent(
            request_id=request.request_id,
            user_id=user,
            type=EventType.ADMITTED,
            at=utc_now(),
            queue_position=3,
            request=request,
        )
        failure = GenerationResult(
            request_id=request.request_id,
            user_id=user,
            status=Status.FAILED,
            reason=Reason.RENDER_ERROR,
            detail="out of memory",
            completed_at=utc_now(),
        )
        unwatched = _request(user, receiver.url)  # completed only: its queued is not sent
        unwatched_queued = queued.model_copy(
            update={"request_id": unwatched.request_id, "request": None}
        )
        produce(settings, EVENTS, [queued, unwatched_queued, _finished(request, failure)])
        deliveries = receiver.wait_for(2)
    jobs = sorted(
        (verify(d.body, d.headers, secret) for d in deliveries), key=lambda job: job["status"]
    )
    assert [(job["status"], job["id"]) for job in jobs] == [
        ("failed", request.request_id),
        ("queued", request.request_id),
    ]
    assert jobs[0]["error"] == {
        "reason": "render_error",
        "detail": "out of memory",
        "retry_after_ms": None,
    }
    assert jobs[1]["queue_position"] == 3


def _same_partition_as(
    first: GenerationRequest, make: Callable[[], GenerationRequest]
) -> GenerationRequest:
    wanted = partition_for(first.request_id.encode(), EVENT_PARTITIONS)
    while partition_for((candidate := make()).request_id.encode(), EVENT_PARTITIONS) != wanted:
        pass
    return candidate


def test_a_delivery_outlives_a_killed_deliverer(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL after a failed attempt: the retry is on the broker, and the next deliverer
    (another process, in the same group) delivers it under the same webhook-id."""
    user = _user()
    secret = _secret(settings, user)
    env = {
        **settings_env(settings),
        "IMAGEGEN_WEBHOOK_FIRST_RETRY_S": "1",
        "IMAGEGEN_LOG_LEVEL": "debug",
    }
    with Receiver(lambda n: "fail" if n == 1 else "ok") as receiver:
        first = Service(["webhooks"], env, tmp_path / "first.log")
        first.start()
        request = _request(user, receiver.url)
        produce(settings, EVENTS, [_succeeded_event(settings, request)])
        receiver.wait_for(1, timeout_s=90)
        first.kill()
        second = Service(["webhooks"], env, tmp_path / "second.log")
        second.start()
        try:
            failed, delivered = receiver.wait_for(2, timeout_s=120)
        finally:
            assert second.stop() == 0, second.log.read_text()[-3000:]
    assert (failed.answer, delivered.answer) == ("fail", "ok")
    assert failed.headers["webhook-id"] == delivered.headers["webhook-id"]
    assert verify(delivered.body, delivered.headers, secret)["id"] == request.request_id


def test_a_user_with_too_many_in_flight_waits_alone(settings: Settings) -> None:
    """One in flight per user: the second delivery to a hanging receiver is put off (to the
    first retry topic), and the next user's goes at once."""
    slow_user, quick_user = _user(), _user()
    for user in (slow_user, quick_user):
        _secret(settings, user)
    with (
        Receiver(lambda n: "hang" if n == 1 else "ok") as hanging,
        Receiver() as quick,
        running_deliverer(settings, webhook_concurrency_per_user=1, webhook_read_timeout_s=120),
    ):
        first = _request(slow_user, hanging.url)
        second = _same_partition_as(first, lambda: _request(slow_user, hanging.url))
        other = _same_partition_as(first, lambda: _request(quick_user, quick.url))
        before = _deferred()
        produce(settings, EVENTS, [_succeeded_event(settings, r) for r in (first, second, other)])
        hanging.wait_for(1)
        quick.wait_for(1)
        # Read in partition order: the second was put off before the other user's went.
        assert _deferred() > before
        assert len(hanging.received()) == 1
        hanging.release()
        later = hanging.wait_for(2)[1]
    assert json.loads(later.body)["id"] == second.request_id


def _deferred() -> float:
    deferred = {"outcome": "deferred"}
    return REGISTRY.get_sample_value("imagegen_webhook_deliveries_total", deferred) or 0.0


def test_a_retry_waiting_through_a_rebalance_is_delivered(settings: Settings) -> None:
    """The waiting retry's partition is paused, and librdkafka keeps a pause across a
    partition's revocation and return."""
    user = _user()
    _secret(settings, user)
    with (
        Receiver(lambda n: "fail" if n == 1 else "ok") as receiver,
        # Long enough for the rebalance to happen while the retry waits.
        running_deliverer(settings, webhook_first_retry_s=12.0),
    ):
        produce(settings, EVENTS, [_succeeded_event(settings, _request(user, receiver.url))])
        receiver.wait_for(1)
        _join_and_leave(settings)
        failed, delivered = receiver.wait_for(2, timeout_s=60)
    assert (failed.answer, delivered.answer) == ("fail", "ok")


def _join_and_leave(settings: Settings) -> None:
    """Another member joins the deliverer's group, is given partitions, and leaves."""
    assigned = threading.Event()
    member = make_consumer(settings, WEBHOOK_GROUP)
    member.subscribe([EVENTS, *WEBHOOK_RETRIES], on_assign=lambda *_: assigned.set())
    deadline = time.monotonic() + 60
    try:
        while not assigned.is_set():
            assert time.monotonic() < deadline, "the other member was never assigned"
            member.poll(0.1)
    finally:
        member.close()
