"""`GenerationResult`: the one answer to a request, on `imagegen.results`, keyed by request_id."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.schemas.fields import SCHEMA_VERSION, ModelName, RequestId, Seed, UserId, UtcDatetime


class Status(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


class Reason(StrEnum):
    """Stable codes for why a request did not succeed. Programs branch on these, never on
    `detail`."""

    INVALID_REQUEST = "invalid_request"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_MODEL = "unknown_model"
    RENDER_ERROR = "render_error"
    STORE_ERROR = "store_error"
    PUBLISH_ERROR = "publish_error"


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    queue_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    render_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    encode_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    upload_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    total_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)


_SUCCESS_FIELDS = ("bucket", "object_key", "content_type", "size_bytes", "sha256")


class GenerationResult(BaseModel):
    """Version 1 of the wire contract. Which optional fields are set depends on `status`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    status: Status
    reason: Reason | None = None
    detail: str | None = Field(default=None, max_length=4000)
    retry_after_ms: int | None = Field(default=None, ge=0)
    duplicate_of: RequestId | None = None
    bucket: str | None = None
    object_key: str | None = None
    content_type: str | None = None
    size_bytes: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    model: ModelName | None = None
    seed: Seed | None = None
    steps: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(
        default=None, ge=1, description="How many requests shared the forward pass."
    )
    timings: Timings | None = None
    attempts: int = Field(default=0, ge=0)
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
        elif self.status in (Status.FAILED, Status.REJECTED) and self.reason is None:
            raise ValueError(f"a {self.status} result needs a reason")
        if (self.status is Status.DUPLICATE) != (self.duplicate_of is not None):
            raise ValueError("duplicate_of is set exactly when status is duplicate")
        if self.retry_after_ms is not None and self.reason is not Reason.RATE_LIMITED:
            raise ValueError("retry_after_ms belongs to rate_limited results only")
        return self

    @property
    def kafka_key(self) -> bytes:
        return self.request_id.encode()
