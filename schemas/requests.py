"""`GenerationRequest`: what users publish to `imagegen.requests`, keyed by `user_id`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict

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
    Strength,
    UploadKey,
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
#: An image from the prompt alone; one moved from an input image (`edit`); or an input
#: image repainted where its mask is white (`inpaint`).
Task = Literal["generate", "edit", "inpaint"]
#: The strength of an edit or inpaint that names none.
DEFAULT_STRENGTH = 0.8


def _task_rules() -> JsonDict:
    """The task rules of `GenerationRequest`'s validators, as JSON Schema."""
    absent: JsonDict = {"type": "null"}
    present: JsonDict = {"not": {"type": "null"}}

    def task_is(*tasks: str) -> JsonDict:
        return {"required": ["task"], "properties": {"task": {"enum": list(tasks)}}}

    return {
        "allOf": [
            {
                "if": task_is("edit", "inpaint"),
                "then": {"required": ["image"], "properties": {"image": present}},
                "else": {"properties": dict.fromkeys(("image", "strength"), absent)},
            },
            {
                "if": task_is("inpaint"),
                "then": {"required": ["mask"], "properties": {"mask": present}},
                "else": {"properties": {"mask": absent}},
            },
        ]
    }


class GenerationRequest(BaseModel):
    """One image to generate. Version 1 of the wire contract."""

    # strict: "5" is not 5 and true is not 1 on the wire; forbid: a typo'd field is an error,
    # not a silently ignored option.
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, json_schema_extra=_task_rules()
    )

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
    task: Task = "generate"
    image: UploadKey | None = Field(
        default=None,
        validate_default=True,
        description="edit and inpaint: the input image, an upload of this request's user "
        "(uploads/user=<user_id>/<sha256>.<png|jpeg|webp>); resized to width x height.",
    )
    mask: UploadKey | None = Field(
        default=None,
        validate_default=True,
        description="inpaint only: an upload of the image's size; its white pixels are "
        "repainted and its black ones kept (grey: in between).",
    )
    strength: Strength | None = Field(
        default=None,
        description="edit and inpaint: how far to move from the input image, 0 < s <= 1; "
        f"when absent, {DEFAULT_STRENGTH}. The render runs int(steps x strength) steps.",
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

    # task is declared before image, mask and strength, so it is in info.data by then (when
    # it is valid).
    @field_validator("image")
    @classmethod
    def _image_goes_with_edits(cls, image: str | None, info: ValidationInfo) -> str | None:
        task = info.data.get("task")
        if task in ("edit", "inpaint") and image is None:
            raise ValueError(f"is needed by task {task}")
        if task == "generate" and image is not None:
            raise ValueError("belongs to the tasks edit and inpaint, not generate")
        return image

    @field_validator("mask")
    @classmethod
    def _mask_goes_with_inpaint(cls, mask: str | None, info: ValidationInfo) -> str | None:
        task = info.data.get("task")
        if task == "inpaint" and mask is None:
            raise ValueError("is needed by task inpaint")
        if task in ("generate", "edit") and mask is not None:
            raise ValueError(f"belongs to the task inpaint, not {task}")
        return mask

    @field_validator("strength")
    @classmethod
    def _strength_goes_with_edits(
        cls, strength: float | None, info: ValidationInfo
    ) -> float | None:
        if strength is not None and info.data.get("task") == "generate":
            raise ValueError("belongs to the tasks edit and inpaint, not generate")
        return strength

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

    @property
    def inputs(self) -> list[str]:
        """The object keys of the request's input images: image, then mask."""
        return [key for key in (self.image, self.mask) if key is not None]

    @property
    def edit_strength(self) -> float | None:
        """The strength an edit or inpaint renders with; None for `generate`."""
        if self.task == "generate":
            return None
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    def deadline(self, default_ttl_s: float) -> datetime:
        """When the request expires: `expires_at`, else `submitted_at` + `default_ttl_s`."""
        if self.expires_at is not None:
            return self.expires_at
        return self.submitted_at + timedelta(seconds=default_ttl_s)
