"""The body of a webhook: the job document, exactly as `GET /v1/images/jobs/{id}` shows it,
built from the delivery alone (its event carries the request, and at the end the result).

Built again for every attempt, so that a retry hours later carries an image URL that is
valid for IMAGEGEN_GATEWAY_URL_TTL_S from then, not one that expired meanwhile.
"""

from __future__ import annotations

from datetime import datetime

from imagegen.gateway.hub import LiveState
from imagegen.gateway.views import UrlSigner, job_view
from imagegen.schemas.events import EventType
from imagegen.schemas.webhook_deliveries import WebhookDelivery


def job_document(
    delivery: WebhookDelivery, sign: UrlSigner, url_ttl_s: int, now: datetime
) -> bytes:
    event = delivery.event
    assert event.request is not None, "a delivery's event carries its request"
    live = _live_state(delivery)
    job = job_view(event.request, event.result, live, sign, url_ttl_s, now)
    return job.model_dump_json().encode()


def _live_state(delivery: WebhookDelivery) -> LiveState:
    event = delivery.event
    started_at = event.at if event.type is EventType.STARTED else delivery.started_at
    return LiveState(
        admitted=True,
        started_at=started_at,
        step=event.step,
        steps=event.steps,
        queue_position=event.queue_position,
        estimated_start_at=event.estimated_start_at,
        result=event.result,
    )
