"""`JobEvent`: what happens to a request on its way, on `imagegen.events`, keyed by request_id.

Events are for watching a job; its result on `imagegen.results` stays the one answer. The
processor sends `admitted` (and `finished` for the requests it answers itself); the worker
sends `started`, `progress` and `finished`. All of a request's events share its key, so
they lie in one partition in the order they were sent.

An event of a request with a webhook (`GenerationRequest.webhook_wants`) carries the request,
and a `finished` one the result as well: the webhook deliverer builds the job document from
the event alone. Other events stay small.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from imagegen.schemas.fields import (
    SCHEMA_VERSION,
    NonNegativeInt,
    PositiveInt,
    RequestId,
    SchemaVersion,
    UserId,
    UtcDatetime,
)
from imagegen.schemas.requests import GenerationRequest
from imagegen.schemas.results import GenerationResult, Status


class EventType(StrEnum):
    #: The processor admitted the request to a render queue.
    ADMITTED = "admitted"
    #: A worker began rendering it.
    STARTED = "started"
    #: A denoising step finished: `step` of `steps`.
    PROGRESS = "progress"
    #: Its result is published; `status` says which.
    FINISHED = "finished"


class JobEvent(BaseModel):
    """Version 1 of the wire contract."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    type: EventType
    at: UtcDatetime
    step: NonNegativeInt | None = Field(default=None, description="Steps done, for progress.")
    steps: PositiveInt | None = Field(default=None, description="Steps in all, for progress.")
    queue_position: NonNegativeInt | None = Field(
        default=None, description="Requests ahead of this one when it was admitted."
    )
    estimated_start_at: UtcDatetime | None = Field(
        default=None, description="When a render is expected to start, where known."
    )
    status: Status | None = Field(default=None, description="The result's status, once finished.")
    worker_id: str | None = Field(default=None, max_length=256)
    request: GenerationRequest | None = Field(
        default=None,
        description="The request, on the events its webhook is sent on, so that the webhook "
        "deliverer looks nothing up.",
    )
    result: GenerationResult | None = Field(
        default=None, description="The result, on a finished event that carries the request."
    )

    @property
    def kafka_key(self) -> bytes:
        return self.request_id.encode()
