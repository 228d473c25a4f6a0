"""`CancelRequest`: a user's wish to stop a request, on the compacted `imagegen.cancellations`,
keyed by request_id (so compaction keeps one per request)."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict

from imagegen.schemas.codec import build
from imagegen.schemas.fields import (
    SCHEMA_VERSION,
    RequestId,
    SchemaVersion,
    UserId,
    UtcDatetime,
    utc_now,
)


class CancelRequest(BaseModel):
    """Version 1 of the wire contract. Honoured only when `user_id` is the request's own."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    requested_at: UtcDatetime

    @classmethod
    def new(cls, **fields: Any) -> Self:
        """A cancellation with `requested_at` filled in unless given; `InvalidMessage` names
        every bad field."""
        fields.setdefault("requested_at", utc_now())
        return build(cls, fields)

    @property
    def kafka_key(self) -> bytes:
        return self.request_id.encode()
