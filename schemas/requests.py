"""`GenerationRequest`: what users publish to `imagegen.requests`, keyed by `user_id`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

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
    new_request_id,
    utc_now,
)

OutputFormat = Literal["png", "jpeg", "webp"]
#: `interactive` work is rendered first; `batch` work only while no interactive work waits.
Priority = Literal["interactive", "batch"]


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

    def deadline(self, default_ttl_s: float) -> datetime:
        """When the request expires: `expires_at`, else `submitted_at` + `default_ttl_s`."""
        if self.expires_at is not None:
            return self.expires_at
        return self.submitted_at + timedelta(seconds=default_ttl_s)
