"""Field types shared by the request and result contracts."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Final

from pydantic import AfterValidator, AwareDatetime, Field, PlainSerializer
from ulid import ULID

SCHEMA_VERSION: Final = 1

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


def _canonical_request_id(value: str) -> str:
    # One spelling per id: dedupe and object keys compare request ids as strings.
    if _UUID.fullmatch(value) or _ULID.fullmatch(value):
        return value
    raise ValueError(
        "must be a UUID in lowercase 8-4-4-4-12 form or a ULID of 26 uppercase Crockford "
        "base32 characters"
    )


def _printable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain at least one non-whitespace character")
    return value


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (got {value}; try {value - value % 8})")
    return value


def _no_parent_segments(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError("must not contain '..' path segments")
    return value


def _as_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def new_request_id() -> str:
    """A fresh ULID: unique, and sortable by creation time."""
    return str(ULID())


def utc_now() -> datetime:
    return datetime.now(UTC)


RequestId = Annotated[str, AfterValidator(_canonical_request_id)]
UserId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._@-]{1,128}$")]
Prompt = Annotated[
    str,
    Field(min_length=1, max_length=2000),
    AfterValidator(_printable),
    AfterValidator(_not_blank),
]
NegativePrompt = Annotated[str, Field(max_length=2000), AfterValidator(_printable)]
ModelName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"),
    AfterValidator(_no_parent_segments),
]
ImageSide = Annotated[
    int,
    Field(ge=64, le=2048, json_schema_extra={"multipleOf": 8}),
    AfterValidator(_multiple_of_8),
]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
UtcDatetime = Annotated[
    AwareDatetime,
    AfterValidator(_as_utc),
    PlainSerializer(lambda value: value.isoformat().replace("+00:00", "Z"), return_type=str),
]
