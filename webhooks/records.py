"""Which consumed records are deliveries: the events a webhook is sent on, and the retries.

An event is a delivery when it carries its request and the request's webhook is sent on it
(`schemas.events`); most events carry no request, and are passed over without decoding. A
retry record is a `WebhookDelivery` the deliverer wrote. One with a valid `replay.of` mark
(`imagegen dlq replay`) starts over: its budget counts from now.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import datetime

from confluent_kafka import Message

from imagegen.infra.kafka import consumed_headers
from imagegen.infra.replay_marks import verify
from imagegen.infra.settings import Settings
from imagegen.schemas import JobEvent, decode
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.events import EventType
from imagegen.schemas.headers import REPLAY_HEADER
from imagegen.schemas.webhook_deliveries import WEBHOOK_EVENT, WebhookDelivery, first_delivery

log = logging.getLogger(__name__)

#: Jobs whose start the deliverer remembers, for the documents of their later events.
_STARTS_KEPT = 100_000
# Only an event that carries its request has this key; `"request_id":` does not match it.
_CARRIES_REQUEST = b'"request":'


class StartTimes:
    """When each watched job's render began, for the `started_at` of its later documents.
    Bounded: the oldest is forgotten first (and a restarted deliverer knows none)."""

    def __init__(self, capacity: int = _STARTS_KEPT) -> None:
        self._capacity = capacity
        self._starts: OrderedDict[str, datetime] = OrderedDict()

    def saw(self, event: JobEvent) -> datetime | None:
        """Note `event`; return its job's start, where known."""
        if event.type is EventType.STARTED:
            self._starts[event.request_id] = event.at
            while len(self._starts) > self._capacity:
                self._starts.popitem(last=False)
            return event.at
        if event.type is EventType.FINISHED:
            return self._starts.pop(event.request_id, None)
        return self._starts.get(event.request_id)


def delivery_of_event(
    message: Message, starts: StartTimes, now: datetime
) -> WebhookDelivery | None:
    value = message.value()
    if value is None or _CARRIES_REQUEST not in value:
        return None
    try:
        event = decode(JobEvent, value)
    except InvalidMessage as exc:
        # Events are for watching: a bad one is passed over, as every reader of them does.
        log.warning("skipping an unreadable job event: %s", exc)
        return None
    started_at = starts.saw(event)
    if event.request is None or not _wanted(event):
        return None
    return first_delivery(event, started_at, now)


def delivery_of_retry(message: Message, settings: Settings, now: datetime) -> WebhookDelivery:
    """Raises `InvalidMessage` for a record that is not a delivery."""
    delivery = decode(WebhookDelivery, message.value())
    if delivery.event.request is None or delivery.event.request.webhook_url is None:
        raise InvalidMessage(
            "invalid WebhookDelivery: its event carries no request with a webhook_url",
            [("event.request", "required")],
        )
    mark = dict(consumed_headers(message) or []).get(REPLAY_HEADER)
    if mark is None:
        return delivery
    if verify(mark, settings) is None:
        log.warning(
            "webhook %s has a replay mark that does not verify; it keeps its spent budget. "
            "Set IMAGEGEN_REPLAY_KEY here to the key `imagegen dlq replay` signs with",
            delivery.webhook_id,
        )
        return delivery
    return delivery.model_copy(update={"attempts": 0, "first_attempt_at": now, "not_before": now})


def _wanted(event: JobEvent) -> bool:
    assert event.request is not None
    return event.request.webhook_wants(WEBHOOK_EVENT[event.type])
