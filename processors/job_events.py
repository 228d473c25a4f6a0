"""The job events the processor sends: `admitted` for each admission, `finished` for each
result it publishes itself. They are for watching a job, so they are sent best-effort: a
send that fails is counted (`imagegen_events_unsent_total`) and logged, and never holds
back, fails or dead-letters the request it is about. Nothing waits for their
acknowledgement before the batch is acked; a crash may lose the last few.

The exception: a `finished` event that a webhook is sent on carries the request and result
(`schemas.events`), and the app sends it as it sends the result, at least once: a job's
`completed` webhook must not be lost, and its end is never told again.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from faust.types import ProducerT

from imagegen.infra.metrics import EVENTS_UNSENT, RECORDS_PRODUCED
from imagegen.processors.load import QueueEstimate
from imagegen.schemas import GenerationRequest, GenerationResult, JobEvent, Status, encode
from imagegen.schemas.events import EventType
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import EVENTS

log = logging.getLogger(__name__)


def admitted(request: GenerationRequest, queue: QueueEstimate | None) -> JobEvent:
    """`queue_position` is what waits ahead of it; `estimated_start_at` is set only where
    the fleet's throughput is measured."""
    at = utc_now()
    wait_s = queue.wait_s if queue is not None else None
    return JobEvent(
        request_id=request.request_id,
        user_id=request.user_id,
        type=EventType.ADMITTED,
        at=at,
        queue_position=queue.ahead if queue is not None else None,
        estimated_start_at=at + timedelta(seconds=wait_s) if wait_s is not None else None,
        request=request if request.webhook_wants("status") else None,
    )


def finished(result: GenerationResult, request: GenerationRequest | None) -> JobEvent:
    """With the request and result on it where the request's webhook is sent on its end.
    A duplicate's end is its original's, whose own webhook tells it."""
    hooked = (
        request is not None
        and result.status is not Status.DUPLICATE
        and request.webhook_wants("completed")
    )
    return JobEvent(
        request_id=result.request_id,
        user_id=result.user_id,
        type=EventType.FINISHED,
        at=utc_now(),
        status=result.status,
        request=request if hooked else None,
        result=result if hooked else None,
    )


async def send(producer: ProducerT, event: JobEvent) -> None:
    """Hand `event` to the producer and return at once; its outcome is only counted."""
    try:
        acknowledged = await producer.send(
            EVENTS, event.kafka_key, encode(event), None, timestamp=None, headers=None
        )
    except Exception as exc:
        _unsent(event, exc)
        return
    future = asyncio.ensure_future(acknowledged)
    future.add_done_callback(lambda done: _settled(event, done))


def _settled(event: JobEvent, done: asyncio.Future[Any]) -> None:
    if done.cancelled():
        _unsent(event, asyncio.CancelledError())
    elif done.exception() is not None:
        _unsent(event, done.exception())
    else:
        RECORDS_PRODUCED.labels(EVENTS).inc()


def _unsent(event: JobEvent, error: BaseException | None) -> None:
    EVENTS_UNSENT.inc()
    # The type and the error's class and text only: an event carries nothing secret, but a
    # client error may quote the configuration it was built from.
    log.warning(
        "a %s event was not sent to %s (%s); its request goes on",
        event.type.value,
        EVENTS,
        type(error).__name__,
        extra={"request_id": event.request_id},
    )
