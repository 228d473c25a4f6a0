"""Bytes to contract models and back. Every decoding error names the field it is about."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.fields import PATTERN_HELP, SCHEMA_VERSION

Model = TypeVar("Model", bound=BaseModel)

#: A request is a few KiB at most; anything far bigger is abuse or a bug, not a request.
MAX_MESSAGE_BYTES = 64 * 1024


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=True).encode()


def decode(model: type[Model], data: bytes | None) -> Model:
    """Parse one Kafka value as `model`, or raise `InvalidMessage` naming every bad field."""
    name = model.__name__
    if data is None:
        raise InvalidMessage(f"invalid {name}: the message has no value", [("", "no value")])
    if len(data) > MAX_MESSAGE_BYTES:
        problem = f"message is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}"
        raise InvalidMessage(f"invalid {name}: {problem}", [("", problem)])
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise _invalid(name, exc) from None


def build(model: type[Model], fields: Mapping[str, Any]) -> Model:
    """Validate Python values as `model`, with the same errors as `decode`."""
    try:
        return model.model_validate(dict(fields))
    except ValidationError as exc:
        raise _invalid(model.__name__, exc) from None


def _invalid(name: str, exc: ValidationError) -> InvalidMessage:
    problems = [_describe(error) for error in exc.errors(include_url=False)]
    summary = "; ".join(f"{field}: {text}" if field else text for field, text in problems)
    return InvalidMessage(f"invalid {name}: {summary}", problems)


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    field = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        return "", f"not valid UTF-8 JSON ({error['ctx']['error']})"
    if kind == "extra_forbidden":
        return field, f"unknown field (not part of schema version {SCHEMA_VERSION})"
    if kind == "missing":
        return field, "required"
    if kind == "string_pattern_mismatch":
        return field, PATTERN_HELP.get(error["ctx"]["pattern"], message)
    if field == "schema_version" and kind == "literal_error":
        return field, (
            f"unsupported version {error['input']!r}; this build reads version {SCHEMA_VERSION}"
        )
    return field, message
