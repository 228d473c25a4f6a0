"""`GenerationRequest`: what users publish to `imagegen.requests`, keyed by `user_id`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from imagegen.schemas.codec import build
from imagegen.schemas.fields import (
    SCHEMA_VERSION,
    IdempotencyKey,
    ImageSide,
    ModelName,
    NegativePrompt,
    Prompt,
    RequestId,
    SchemaVersion,
    Seed,
    Steps,
    UserId,
    UtcDatetime,
    WebhookUrl,
    new_request_id,
    utc_now,
)

OutputFormat = Literal["png", "jpeg", "webp"]
#: `interactive` work is rendered first; `batch` work only while no interactive work waits.
Priority = Literal["interactive", "batch"]
#: What a webhook is sent on: the job's end, its steps, its queued/running changes.
WebhookEvent = Literal["completed", "progress", "status"]


class GenerationRequest(BaseModel):
    """One image to generate. Version 1 of the wire contract."""

    # strict: "5" is not 5 and true is not 1 on the wire; forbid: a typo'd field is an error,
    # not a silently ignored option.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    prompt: Prompt
    negative_prompt: NegativePrompt | None = None
    model: ModelName = "tiny"
    width: ImageSide = 512
    height: ImageSide = 512
    steps: Steps = 25
    guidance_scale: float = Field(default=7.5, ge=0, le=30, allow_inf_nan=False)
    seed: Seed | None = Field(
        default=None,
        description="When absent, the worker derives one from request_id so re-renders match.",
    )
    idempotency_key: IdempotencyKey | None = None
    output_format: OutputFormat = "png"
    submitted_at: UtcDatetime
    priority: Priority = "interactive"
    expires_at: UtcDatetime | None = Field(
        default=None,
        description="No render starts after this; when absent, submitted_at plus the "
        "deployment's IMAGEGEN_DEFAULT_TTL_S.",
    )
    webhook_url: WebhookUrl | None = Field(
        default=None,
        description="Where `imagegen webhooks` POSTs the job, signed with the user's webhook "
        "secret (Standard Webhooks), on each event in webhook_events.",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None,
        min_length=1,
        max_length=3,
        description="Which events the webhook is sent on; when absent, `completed` only.",
    )

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events_need_a_url(
        cls, events: list[WebhookEvent] | None, info: ValidationInfo
    ) -> list[WebhookEvent] | None:
        # webhook_url is declared first, so it is validated (and in info.data) by now.
        if events is not None:
            if info.data.get("webhook_url") is None:
                raise ValueError("needs a webhook_url")
            if len(set(events)) != len(events):
                raise ValueError("lists an event twice")
        return events

    @classmethod
    def new(cls, **fields: Any) -> Self:
        """A request with `request_id` and `submitted_at` filled in unless given.

        Raises `InvalidMessage` naming every bad field.
        """
        fields.setdefault("request_id", new_request_id())
        fields.setdefault("submitted_at", utc_now())
        return build(cls, fields)

    @property
    def kafka_key(self) -> bytes:
        return self.user_id.encode()

    def webhook_wants(self, event: WebhookEvent) -> bool:
        """Whether the request's webhook is sent on `event`."""
        if self.webhook_url is None:
            return False
        return event in (self.webhook_events or ("completed",))

    def deadline(self, default_ttl_s: float) -> datetime:
        """When the request expires: `expires_at`, else `submitted_at` + `default_ttl_s`."""
        if self.expires_at is not None:
            return self.expires_at
        return self.submitted_at + timedelta(seconds=default_ttl_s)
