"""Field types shared by the request and result contracts.

Every rule on a string is one regular expression, written for two engines at once: decoding
applies it with Python's `re` (compiled patterns make pydantic use `re`, whose look-ahead its
default engine lacks), and the exported JSON Schema carries the same text for any other
validator (ECMA-262 regexes, or Python's `re` in the `jsonschema` package). So the patterns
keep to what both read alike: `[0-9]`, never `\\d` (Python takes any Unicode digit), and
explicit character classes, never `\\s`.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from ulid import ULID

SCHEMA_VERSION: Final = 1


def _whole(body: str) -> re.Pattern[str]:
    # `(?!\n)`: Python's `$` also matches before a final newline, which would let "alice\n"
    # through; ECMA-262 needs no such guard, and reads it the same.
    return re.compile(rf"^(?:{body})$(?!\n)")


# What `str.isspace()` calls whitespace (a test checks the list), so "blank" means the same
# to every engine.
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# Years 0002-9998: any offset then converts to a UTC year that Python's datetime holds.
_YEAR_RANGE = r"(?!0000|0001|9999)"
_LEAP_YEAR = r"[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00"
_MONTH_DAY = (
    r"(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8])"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
_OFFSET = r"Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]"

REQUEST_ID_PATTERN: Final = _whole(
    # One spelling per id: dedupe and object keys compare request ids as strings.
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-7][0-9A-HJKMNP-TV-Z]{25}"
)
USER_ID_PATTERN: Final = _whole(r"[A-Za-z0-9._@-]{1,128}")
PROMPT_PATTERN: Final = _whole(rf"[{_SPACE}]*[^{_SPACE}\x00][^\x00]*")
NO_NUL_PATTERN: Final = _whole(r"[^\x00]*")
MODEL_PATTERN: Final = _whole(r"(?!(?:.*/)?\.\.(?:/|$))[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
IDEMPOTENCY_KEY_PATTERN: Final = _whole(r"[^\x00-\x1f\x7f]{1,128}")
SHA256_PATTERN: Final = _whole(r"[0-9a-f]{64}")
API_KEY_ID_PATTERN: Final = _whole(r"[a-z0-9]{12}")
# Any character but a control one (Unicode Cc); the length is `maxLength`'s, which counts
# code points in every engine (a regex count would count UTF-16 units in ECMA-262).
LABEL_PATTERN: Final = _whole(r"[^\x00-\x1f\x7f-\x9f]+")
# http(s) and no spaces or control characters; which schemes and hosts a deliverer accepts is
# the deployment's (`infra.webhook_targets`), so the contract stays this loose.
WEBHOOK_URL_PATTERN: Final = _whole(r"[Hh][Tt][Tt][Pp][Ss]?://[^\x00-\x20\x7f-\x9f]+")
WEBHOOK_ID_PATTERN: Final = _whole(r"msg_[0-9a-f]{32}")
# `uploads/user=<user_id>/<sha256>.<format>`: the user id is one segment (it holds no "/"),
# so no key escapes its user's prefix, and the name comes from the content.
UPLOAD_KEY_PATTERN: Final = _whole(
    r"uploads/user=[A-Za-z0-9._@-]{1,128}/[0-9a-f]{64}\.(?:png|jpeg|webp)"
)
DATE_TIME_PATTERN: Final = _whole(
    rf"{_YEAR_RANGE}(?:[0-9]{{4}}-(?:{_MONTH_DAY})|(?:{_LEAP_YEAR})-02-29)T{_TIME}(?:{_OFFSET})"
)

#: Plain words for each pattern, for decoding errors.
PATTERN_HELP: Final = {
    REQUEST_ID_PATTERN.pattern: "must be a UUID in lowercase 8-4-4-4-12 form or a ULID of 26 "
    "uppercase Crockford base32 characters",
    USER_ID_PATTERN.pattern: "must be 1-128 characters of letters, digits, '.', '_', '@' or '-'",
    PROMPT_PATTERN.pattern: "must contain at least one non-whitespace character, and no NUL "
    "characters",
    NO_NUL_PATTERN.pattern: "must not contain NUL characters",
    MODEL_PATTERN.pattern: "must be 1-128 characters of letters, digits, '.', '_', '/' or '-', "
    "starting with a letter or digit, with no '..' path segment",
    IDEMPOTENCY_KEY_PATTERN.pattern: "must be 1-128 characters, none of them control characters",
    SHA256_PATTERN.pattern: "must be 64 lowercase hex digits",
    API_KEY_ID_PATTERN.pattern: "must be 12 lowercase letters or digits",
    LABEL_PATTERN.pattern: "must not be empty nor contain control characters",
    WEBHOOK_URL_PATTERN.pattern: "must be an https:// URL without spaces or control characters",
    WEBHOOK_ID_PATTERN.pattern: "must be msg_ and 32 lowercase hex digits",
    UPLOAD_KEY_PATTERN.pattern: "must be an upload's object key, uploads/user=<user_id>/"
    "<sha256>.<png|jpeg|webp> (`imagegen upload` prints it)",
}


def _json_integer(value: object) -> object:
    # JSON has one kind of number, and to JSON Schema an "integer" is any number with a zero
    # fractional part: 512.0 is 512 there, so it is here.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json_version(value: object) -> object:
    # Literal[1] alone would take true (True == 1 in Python); JSON Schema does not.
    if isinstance(value, bool):
        raise ValueError(f"must be the number {SCHEMA_VERSION}, not a boolean")
    return _json_integer(value)


def _rfc3339(value: object) -> object:
    # Parsed here rather than by pydantic, which also takes "1700000000", "2026-11-21 10:00Z"
    # and nine fraction digits. Python datetimes (from `build`) pass as they are.
    if not isinstance(value, str):
        return value
    if not DATE_TIME_PATTERN.search(value):
        raise ValueError(
            "must be an RFC 3339 date-time with a timezone offset, like 2026-11-21T10:00:00Z "
            "or 2026-11-21T12:00:00.250+02:00 (capital T and Z, at most 6 fraction digits, "
            "a calendar date in the years 0002-9998)"
        )
    return datetime.fromisoformat(value)


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (got {value}; try {value - value % 8})")
    return value


def _as_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


def new_request_id() -> str:
    """A fresh ULID: unique, and sortable by creation time."""
    return str(ULID())


def utc_now() -> datetime:
    return datetime.now(UTC)


RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
UserId = Annotated[str, Field(pattern=USER_ID_PATTERN)]
Prompt = Annotated[str, Field(min_length=1, max_length=2000, pattern=PROMPT_PATTERN)]
NegativePrompt = Annotated[str, Field(max_length=2000, pattern=NO_NUL_PATTERN)]
ModelName = Annotated[str, Field(pattern=MODEL_PATTERN)]
IdempotencyKey = Annotated[
    str, Field(min_length=1, max_length=128, pattern=IDEMPOTENCY_KEY_PATTERN)
]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
WebhookUrl = Annotated[str, Field(max_length=2048, pattern=WEBHOOK_URL_PATTERN)]
WebhookId = Annotated[str, Field(pattern=WEBHOOK_ID_PATTERN)]
UploadKey = Annotated[str, Field(max_length=220, pattern=UPLOAD_KEY_PATTERN)]
#: How far an edit moves from its input image: 1 keeps nothing of it.
Strength = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
# Every integer on the wire is one of these, so that 512.0 reads as 512. The bounds come
# before the validator: after it, pydantic would export them as "ge"/"le", which JSON Schema
# does not know.
SchemaVersion = Annotated[Literal[1], BeforeValidator(_json_version)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_json_integer)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
Steps = Annotated[int, Field(ge=1, le=100), BeforeValidator(_json_integer)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1), BeforeValidator(_json_integer)]
ImageSide = Annotated[
    int,
    Field(ge=64, le=2048, json_schema_extra={"multipleOf": 8}),
    BeforeValidator(_json_integer),
    AfterValidator(_multiple_of_8),
]
#: A duration in milliseconds. The maximum is the largest finite float: JSON can spell
#: infinity (1e999), which a model refuses and a JSON Schema must too.
Milliseconds = Annotated[float, Field(ge=0, le=sys.float_info.max, allow_inf_nan=False)]
UtcDatetime = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339),
    AfterValidator(_as_utc),
    PlainSerializer(lambda value: value.isoformat().replace("+00:00", "Z"), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": DATE_TIME_PATTERN.pattern}),
]
