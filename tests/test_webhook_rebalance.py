"""The deliverer through a rebalance while a retry waits: the waiting partition is paused,
and librdkafka keeps a pause across a partition's revocation and return."""

from __future__ import annotations

import threading

from imagegen.infra.kafka import make_consumer
from imagegen.infra.settings import Settings
from imagegen.schemas.topics import EVENTS, WEBHOOK_GROUP, WEBHOOK_RETRIES
from tests.helpers import produce
from tests.receivers import Receiver
from tests.test_webhooks import _request, _secret, _succeeded_event, _user, running_deliverer


def test_a_retry_waiting_through_a_rebalance_is_delivered(settings: Settings) -> None:
    user = _user()
    _secret(settings, user)
    with (
        Receiver(lambda n: "fail" if n == 1 else "ok") as receiver,
        running_deliverer(settings, webhook_first_retry_s=8.0),
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
    try:
        while not assigned.is_set():
            member.poll(0.1)
    finally:
        member.close()
