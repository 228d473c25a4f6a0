"""`GenerationResult`: the one answer to a request, on `imagegen.results`, keyed by request_id."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.schemas.fields import (
    SCHEMA_VERSION,
    Milliseconds,
    ModelName,
    NonNegativeInt,
    PositiveInt,
    RequestId,
    SchemaVersion,
    Seed,
    Sha256,
    Strength,
    UploadKey,
    UserId,
    UtcDatetime,
)
from imagegen.schemas.requests import GenerationRequest, Task


class Status(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    #: Its user canceled it before it finished; reason `canceled`.
    CANCELED = "canceled"
    #: Its deadline (`expires_at`) passed before a render started; reason `deadline_exceeded`.
    EXPIRED = "expired"


class Reason(StrEnum):
    """Stable codes for why a request did not succeed. Programs branch on these, never on
    `detail`."""

    INVALID_REQUEST = "invalid_request"
    RATE_LIMITED = "rate_limited"
    #: The request costs more tokens than the user's bucket ever holds: no wait helps.
    EXCEEDS_BURST = "exceeds_burst"
    UNKNOWN_MODEL = "unknown_model"
    RENDER_ERROR = "render_error"
    STORE_ERROR = "store_error"
    PUBLISH_ERROR = "publish_error"
    CANCELED = "canceled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    #: The fleet's backlog would keep the request from starting before its deadline.
    OVERLOADED = "overloaded"
    #: An edit's input image or mask is missing, not an image, too large, of the wrong
    #: size, or leaves no step to run at its strength; `detail` names which.
    INVALID_INPUT_IMAGE = "invalid_input_image"


#: The one reason each of these statuses has.
_STATUS_REASON = {Status.CANCELED: Reason.CANCELED, Status.EXPIRED: Reason.DEADLINE_EXCEEDED}
#: The reasons after which a wait helps, told in `retry_after_ms`.
_RETRY_REASONS = (Reason.RATE_LIMITED, Reason.OVERLOADED)


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    queue_ms: Milliseconds | None = None
    render_ms: Milliseconds | None = None
    encode_ms: Milliseconds | None = None
    upload_ms: Milliseconds | None = None
    total_ms: Milliseconds | None = None


_SUCCESS_FIELDS = ("bucket", "object_key", "content_type", "size_bytes", "sha256")


def _status_rules() -> dict[str, Any]:
    """`GenerationResult._fields_match_status` as JSON Schema, for the published schema.

    A field the model calls absent (None) is, in JSON, either missing or null.
    """
    absent = {"type": "null"}
    present = {"not": {"type": "null"}}

    def status_is(*statuses: Status) -> dict[str, Any]:
        return {"required": ["status"], "properties": {"status": {"enum": list(statuses)}}}

    return {
        "allOf": [
            {
                "if": status_is(Status.SUCCEEDED),
                "then": {
                    "required": list(_SUCCESS_FIELDS),
                    "properties": {**dict.fromkeys(_SUCCESS_FIELDS, present), "reason": absent},
                },
            },
            {
                "if": status_is(Status.FAILED, Status.REJECTED, *_STATUS_REASON),
                "then": {"required": ["reason"], "properties": {"reason": present}},
            },
            {
                "if": status_is(Status.DUPLICATE),
                "then": {"required": ["duplicate_of"], "properties": {"duplicate_of": present}},
                "else": {"properties": {"duplicate_of": absent}},
            },
            *(
                {
                    "if": status_is(status),
                    "then": {"required": ["reason"], "properties": {"reason": {"const": reason}}},
                }
                for status, reason in _STATUS_REASON.items()
            ),
            {
                "if": {"required": ["retry_after_ms"], "properties": {"retry_after_ms": present}},
                "then": {
                    "required": ["reason"],
                    "properties": {"reason": {"enum": list(_RETRY_REASONS)}},
                },
            },
        ]
    }


class GenerationResult(BaseModel):
    """Version 1 of the wire contract. Which optional fields are set depends on `status`."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, json_schema_extra=_status_rules()
    )

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    status: Status
    reason: Reason | None = None
    detail: str | None = Field(default=None, max_length=4000)
    retry_after_ms: NonNegativeInt | None = None
    duplicate_of: RequestId | None = None
    # Bounded, like every string here, so that any valid result fits in a message: S3 names
    # buckets in at most 63 characters and keys in 1024 bytes; RFC 6838 media types are
    # two names of at most 127 characters.
    bucket: str | None = Field(default=None, max_length=63)
    object_key: str | None = Field(default=None, max_length=1024)
    content_type: str | None = Field(default=None, max_length=255)
    size_bytes: NonNegativeInt | None = None
    sha256: Sha256 | None = None
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    model: ModelName | None = None
    seed: Seed | None = None
    steps: PositiveInt | None = None
    task: Task | None = Field(default=None, description="The request's task, once rendered.")
    image: UploadKey | None = Field(default=None, description="The edit's input image.")
    mask: UploadKey | None = Field(default=None, description="The inpaint's mask.")
    strength: Strength | None = Field(default=None, description="The edit's strength.")
    batch_size: PositiveInt | None = Field(
        default=None, description="How many requests shared the forward pass."
    )
    timings: Timings | None = None
    device_ms: Milliseconds | None = Field(
        default=None,
        description="Device time spent on this request: its share of its batch's render time.",
    )
    attempts: NonNegativeInt = 0
    worker_id: str | None = Field(default=None, max_length=256)
    completed_at: UtcDatetime

    @model_validator(mode="after")
    def _fields_match_status(self) -> Self:
        if self.status is Status.SUCCEEDED:
            missing = [name for name in _SUCCESS_FIELDS if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a succeeded result needs {', '.join(missing)}")
            if self.reason is not None:
                raise ValueError("a succeeded result has no reason")
        elif self.status is not Status.DUPLICATE and self.reason is None:
            raise ValueError(f"a {self.status} result needs a reason")
        if (self.status is Status.DUPLICATE) != (self.duplicate_of is not None):
            raise ValueError("duplicate_of is set exactly when status is duplicate")
        expected = _STATUS_REASON.get(self.status)
        if expected is not None and self.reason is not expected:
            raise ValueError(f"a {self.status} result has reason {expected}")
        if self.retry_after_ms is not None and self.reason not in _RETRY_REASONS:
            raise ValueError("retry_after_ms belongs to rate_limited and overloaded results only")
        return self

    @property
    def kafka_key(self) -> bytes:
        return self.request_id.encode()


def task_fields(request: GenerationRequest) -> dict[str, Any]:
    """What a result records of its request's task: the task, and an edit's inputs and
    strength."""
    return {
        "task": request.task,
        "image": request.image,
        "mask": request.mask,
        "strength": request.edit_strength,
    }
