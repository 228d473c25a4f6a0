"""`WebhookDelivery`: a webhook waiting for its next attempt, on `imagegen.webhooks.retry.N`.

The deliverer (`imagegen webhooks`) writes one when an attempt fails, to the retry topic of
the delay it waits, and reads it back once `not_before` has come. It holds the event the
webhook is about (which carries the request and, at the end, the result), never the job
document: each attempt builds the document afresh, so the image URL in it is always new.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from imagegen.schemas.events import EventType, JobEvent
from imagegen.schemas.fields import (
    SCHEMA_VERSION,
    NonNegativeInt,
    RequestId,
    SchemaVersion,
    UserId,
    UtcDatetime,
    WebhookId,
)
from imagegen.schemas.requests import WebhookEvent

#: The webhook event each job event is sent as.
WEBHOOK_EVENT: dict[EventType, WebhookEvent] = {
    EventType.ADMITTED: "status",
    EventType.STARTED: "status",
    EventType.PROGRESS: "progress",
    EventType.FINISHED: "completed",
}


class WebhookDelivery(BaseModel):
    """Version 1 of the wire contract."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    #: The `webhook-id` header: the same on every attempt, so receivers dedupe on it.
    webhook_id: WebhookId
    #: The job's: `imagegen dlq list --request-id` finds its dead letters by it.
    request_id: RequestId
    user_id: UserId
    event: JobEvent
    #: When the job's render began, where the deliverer saw it: the document shows it.
    started_at: UtcDatetime | None = None
    #: Attempts made so far.
    attempts: NonNegativeInt
    #: The retry budget (IMAGEGEN_WEBHOOK_RETRY_S) counts from here; a replay restarts it.
    first_attempt_at: UtcDatetime
    not_before: UtcDatetime
    #: Why the last attempt failed, without the URL's path or query.
    last_error: str | None = Field(default=None, max_length=1000)

    @property
    def kafka_key(self) -> bytes:
        return self.webhook_id.encode()

    @property
    def kind(self) -> WebhookEvent:
        return WEBHOOK_EVENT[self.event.type]


def webhook_id_of(event: JobEvent) -> str:
    """Derived from the event alone, so that a deliverer reading it again (after a crash,
    before its commit) sends it under the same id."""
    identity = f"{event.request_id}|{event.type.value}|{event.at.isoformat()}|{event.step}"
    return "msg_" + hashlib.sha256(identity.encode()).hexdigest()[:32]


def first_delivery(event: JobEvent, started_at: datetime | None, now: datetime) -> WebhookDelivery:
    return WebhookDelivery(
        webhook_id=webhook_id_of(event),
        request_id=event.request_id,
        user_id=event.user_id,
        event=event,
        started_at=started_at,
        attempts=0,
        first_attempt_at=now,
        not_before=now,
    )
