"""The published JSON Schemas say yes exactly when `decode` does, for requests, results, job
events, cancellations and API key records.

Documents come from two sides: valid ones built from the models' rules (both must accept them),
and near misses, each a valid document with one mutation (a character inserted, a number
nudged, a field dropped, nulled or swapped for an odd value), on which the two must agree,
whichever way. The schema's verdict is taken twice, with and without format checking, so that
`format: date-time` adds nothing the schema's own pattern does not say.

Documents here are interoperable JSON (RFC 8259): UTF-8, no NaN or Infinity, no lone
surrogates. `decode` refuses anything else as not JSON at all, before any schema could apply.
"""

from __future__ import annotations

import json
import string
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from imagegen.schemas import (
    ApiKeyRecord,
    CancelRequest,
    EventType,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    Reason,
    Status,
    decode,
)
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.export import JSON_DIR
from imagegen.schemas.fields import PROMPT_PATTERN

Document = dict[str, Any]

SCHEMAS = {
    GenerationRequest: json.loads((JSON_DIR / "generation_request.v1.json").read_text()),
    GenerationResult: json.loads((JSON_DIR / "generation_result.v1.json").read_text()),
    JobEvent: json.loads((JSON_DIR / "job_event.v1.json").read_text()),
    CancelRequest: json.loads((JSON_DIR / "cancel_request.v1.json").read_text()),
    ApiKeyRecord: json.loads((JSON_DIR / "api_key.v1.json").read_text()),
}
PLAIN = {model: Draft202012Validator(schema) for model, schema in SCHEMAS.items()}
WITH_FORMATS = {
    model: Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for model, schema in SCHEMAS.items()
}

ULID = "01JD8X4ZQ6V1N3K7M9P2R5T8W0"


def verdicts(model: type[BaseModel], data: bytes) -> tuple[bool, bool, bool]:
    """(schema, schema with format checking, decode): whether each accepts `data`."""
    document = json.loads(data)
    try:
        decode(model, data)
    except InvalidMessage:
        decoded = False
    else:
        decoded = True
    return PLAIN[model].is_valid(document), WITH_FORMATS[model].is_valid(document), decoded


def as_json(document: Document) -> bytes:
    return json.dumps(document, ensure_ascii=False, allow_nan=False).encode()


def assert_agree(model: type[BaseModel], document: Document | bytes) -> bool:
    """Assert that schema and decode give `document` the same verdict; return it."""
    data = document if isinstance(document, bytes) else as_json(document)
    schema, formatted, decoded = verdicts(model, data)
    assert schema == formatted == decoded, (
        f"schema {'accepts' if schema else 'refuses'}, with formats "
        f"{'accepts' if formatted else 'refuses'}, decode {'accepts' if decoded else 'refuses'}: "
        f"{data!r}"
    )
    return decoded


# The documents of issue 14 that once passed the schema and failed decode.


def request(**changes: object) -> Document:
    document: Document = {
        "request_id": ULID,
        "user_id": "alice",
        "prompt": "a lighthouse at dusk",
        "submitted_at": "2026-11-21T10:00:00Z",
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({"request_id": "my request"}, False),
        ({"submitted_at": "yesterday"}, False),
        ({"prompt": " \t\n\u3000"}, False),
        ({"prompt": "a\x00b"}, False),
        ({"user_id": "alice\n"}, False),
        # JSON has one kind of number: to JSON Schema 512.0 is the integer 512, so decode
        # reads it as 512 too.
        ({"width": 512.0}, True),
        ({"model": "a/../b"}, False),
    ],
)
def test_the_documents_of_issue_14(changes: Document, accepted: bool) -> None:
    assert assert_agree(GenerationRequest, request(**changes)) is accepted


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({"schema_version": 1.0}, True),
        ({"schema_version": True}, False),
        ({"steps": True}, False),
        ({"steps": 20.5}, False),
        ({"seed": 4294967295.0}, True),
        ({"seed": 4294967296.0}, False),
        ({"guidance_scale": 7}, True),
        ({"idempotency_key": "order-17\n"}, False),
        ({"negative_prompt": "blurry\n"}, True),
        ({"negative_prompt": "\x00"}, False),
        ({"model": "org/name.v2/"}, True),
        ({"model": "org/.."}, False),
        ({"model": "org/..x/y"}, True),
        ({"user_id": "al\u0131ce"}, False),
        ({"request_id": "0b5e2f0e-7d5c-4d2a-9a8e-3f1c2b4a6d7e"}, True),
        ({"request_id": "0B5E2F0E-7D5C-4D2A-9A8E-3F1C2B4A6D7E"}, False),
        ({"request_id": ULID.lower()}, False),
        ({"submitted_at": "2026-11-21T10:00:00.123456+23:59"}, True),
        ({"submitted_at": "2026-11-21T10:00:00.1234567Z"}, False),
        ({"submitted_at": "2026-11-21T10:00:00z"}, False),
        ({"submitted_at": "2026-11-21 10:00:00Z"}, False),
        ({"submitted_at": "2026-11-21T10:00:00+0000"}, False),
        ({"submitted_at": "2026-11-21T10:00Z"}, False),
        ({"submitted_at": "1700000000"}, False),
        ({"submitted_at": 1700000000}, False),
        ({"submitted_at": "2024-02-29T00:00:00Z"}, True),
        ({"submitted_at": "2100-02-29T00:00:00Z"}, False),
        ({"submitted_at": "2026-11-21T10:00:00\n"}, False),
        ({"submitted_at": "\uff12\uff10\uff12\uff16-11-21T10:00:00Z"}, False),
        # Out of range once moved to UTC: decode used to raise OverflowError here.
        ({"submitted_at": "0001-01-01T00:00:00+01:00"}, False),
        ({"submitted_at": "9999-12-31T23:00:00-02:00"}, False),
        ({"submitted_at": "0002-01-01T00:00:00+23:59"}, True),
    ],
)
def test_near_misses_of_requests(changes: Document, accepted: bool) -> None:
    assert assert_agree(GenerationRequest, request(**changes)) is accepted


def succeeded(**changes: object) -> Document:
    document: Document = {
        "request_id": ULID,
        "user_id": "alice",
        "status": "succeeded",
        "bucket": "images",
        "object_key": f"v1/alice/{ULID}.png",
        "content_type": "image/png",
        "size_bytes": 1234,
        "sha256": "ab" * 32,
        "completed_at": "2026-11-21T10:00:01.5Z",
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({}, True),
        ({"reason": None, "duplicate_of": None, "retry_after_ms": None}, True),
        ({"sha256": None}, False),
        ({"sha256": "AB" * 32}, False),
        ({"sha256": "ab" * 32 + "\n"}, False),
        ({"reason": "render_error"}, False),
        ({"status": "failed"}, False),
        ({"status": "failed", "reason": "store_error"}, True),
        ({"status": "rejected", "reason": None}, False),
        ({"status": "rejected", "reason": "rate_limited", "retry_after_ms": 250}, True),
        ({"status": "rejected", "reason": "rate_limited", "retry_after_ms": 250.0}, True),
        ({"status": "rejected", "reason": "invalid_request", "retry_after_ms": 250}, False),
        ({"retry_after_ms": 250}, False),
        ({"status": "duplicate"}, False),
        ({"status": "duplicate", "duplicate_of": ULID}, True),
        ({"duplicate_of": ULID}, False),
        ({"timings": {"render_ms": 12.5, "total_ms": 40}}, True),
        ({"timings": {"render_ms": -1}}, False),
        ({"timings": {"colour": 1}}, False),
        ({"object_key": "k" * 1024, "detail": "d" * 4000, "worker_id": "w" * 256}, True),
        ({"object_key": "k" * 1025}, False),
        ({"bucket": "b" * 64}, False),
        ({"detail": "d" * 4001}, False),
        ({"attempts": 2.0, "width": 64.0}, True),
    ],
)
def test_near_misses_of_results(changes: Document, accepted: bool) -> None:
    assert assert_agree(GenerationResult, succeeded(**changes)) is accepted


def test_infinity_spelled_as_a_number_is_refused_by_both() -> None:
    # 1e999 is valid JSON that parses to infinity; a finite `maximum` is what refuses it.
    data = as_json(succeeded(timings={"render_ms": 1.0})).replace(b"1.0", b"1e999")
    assert assert_agree(GenerationResult, data) is False
    data = as_json(request(guidance_scale=1.0)).replace(b"1.0", b"1e999")
    assert assert_agree(GenerationRequest, data) is False


@pytest.mark.parametrize("year", [2, 1900, 2000, 2023, 2024, 2100, 9998])
def test_every_calendar_date_and_no_other(year: int) -> None:
    for month in range(14):
        for day in range(33):
            text = f"{year:04d}-{month:02d}-{day:02d}T00:00:00Z"
            try:
                datetime(year, month, day)
            except ValueError:
                real = False
            else:
                real = True
            assert assert_agree(GenerationRequest, request(submitted_at=text)) is real, text


def test_blank_means_what_str_isspace_means() -> None:
    # The prompt pattern spells whitespace out, so that every regex engine agrees on it.
    refused = [chr(c) for c in range(sys.maxunicode + 1) if not PROMPT_PATTERN.search(chr(c))]
    expected = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace() or c == 0]
    assert refused == expected


# Valid documents, from the models' rules. Optional fields are left out, set, or null.

NOT_JSON = st.characters(exclude_categories=["Cs"])  # lone surrogates are not UTF-8
TEXT = st.text(NOT_JSON.filter(lambda c: c != "\x00"), max_size=40)
SPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())


ABSENT = object()


def optional(strategy: st.SearchStrategy[Any], nullable: bool = True) -> st.SearchStrategy[Any]:
    """A value for an optional field; `ABSENT` drops the field."""
    choices = st.just(ABSENT) | strategy
    return choices | st.none() if nullable else choices


def integer(low: int, high: int, step: int = 1) -> st.SearchStrategy[int | float]:
    """An integer in [low, high], a multiple of `step`, sometimes spelled as 512.0."""
    number = st.integers(-(-low // step), high // step).map(lambda n: n * step)
    return number | number.map(float)


request_ids = st.from_regex(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", fullmatch=True) | st.uuids().map(str)
user_ids = st.from_regex(r"[A-Za-z0-9._@-]{1,128}", fullmatch=True)
prompts = st.builds(
    lambda before, core, after: before + core + after,
    st.text(st.sampled_from(SPACE), max_size=3),
    st.text(NOT_JSON.filter(lambda c: c != "\x00" and not c.isspace()), min_size=1, max_size=1),
    TEXT,
).filter(lambda text: len(text) <= 2000)
segment = st.text(st.sampled_from(string.ascii_letters + string.digits + "._-"), max_size=6)
models = st.builds(
    lambda first, rest: first + "/".join(rest),
    st.sampled_from(string.ascii_letters + string.digits),
    st.lists(segment, min_size=1, max_size=4),
).filter(lambda name: len(name) <= 128 and ".." not in name.split("/"))
offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """RFC 3339 as the contract spells it: any offset, 0-6 fraction digits, 'Z' for UTC."""
    moment = draw(st.datetimes(datetime(2, 1, 2), datetime(9998, 12, 30), timezones=offsets))
    digits = draw(st.integers(0, 6))
    text = f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}"
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    offset = moment.utcoffset() or timedelta()
    if offset == timedelta() and draw(st.booleans()):
        return text + "Z"
    sign, minutes = ("-", -offset) if offset < timedelta() else ("+", offset)
    hours, rest = divmod(int(minutes.total_seconds()) // 60, 60)
    return f"{text}{sign}{hours:02d}:{rest:02d}"


def documents(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Document]:
    return st.fixed_dictionaries(fields).map(
        lambda drawn: {name: value for name, value in drawn.items() if value is not ABSENT}
    )


valid_requests = documents(
    schema_version=optional(st.sampled_from([1, 1.0]), nullable=False),
    request_id=request_ids,
    user_id=user_ids,
    prompt=prompts,
    negative_prompt=optional(TEXT),
    model=optional(models, nullable=False),
    width=optional(integer(64, 2048, 8), nullable=False),
    height=optional(integer(64, 2048, 8), nullable=False),
    steps=optional(integer(1, 100), nullable=False),
    guidance_scale=optional(integer(0, 30) | st.floats(0, 30), nullable=False),
    seed=optional(integer(0, 2**32 - 1)),
    idempotency_key=optional(
        st.text(NOT_JSON.filter(lambda c: ord(c) > 0x1F and c != "\x7f"), min_size=1, max_size=128)
    ),
    output_format=optional(st.sampled_from(["png", "jpeg", "webp"]), nullable=False),
    submitted_at=timestamps(),
    priority=optional(st.sampled_from(["interactive", "batch"]), nullable=False),
    expires_at=optional(timestamps()),
)

milliseconds = integer(0, 10**9) | st.floats(0, 1e12)
timings = documents(
    **{
        name: optional(milliseconds)
        for name in ("queue_ms", "render_ms", "encode_ms", "upload_ms", "total_ms")
    }
)


@st.composite
def valid_results(draw: st.DrawFn) -> Document:
    status = draw(st.sampled_from(Status))
    # Short strings keep this fast; the length limits have cases of their own above.
    success = {
        "bucket": st.text(NOT_JSON, max_size=63),
        "object_key": st.text(NOT_JSON, max_size=80),
        "content_type": st.sampled_from(["image/png", "image/jpeg", "image/webp", ""]),
        "size_bytes": integer(0, 2**40),
        "sha256": st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    }
    if status is Status.SUCCEEDED:
        reason: st.SearchStrategy[Any] = optional(st.nothing())
    elif status is Status.DUPLICATE:
        reason = optional(st.sampled_from(Reason))
    elif status is Status.CANCELED:
        reason = st.just(Reason.CANCELED)
    elif status is Status.EXPIRED:
        reason = st.just(Reason.DEADLINE_EXCEEDED)
    else:
        reason = st.sampled_from(Reason)
    document = draw(
        documents(
            schema_version=optional(st.sampled_from([1, 1.0]), nullable=False),
            request_id=request_ids,
            user_id=user_ids,
            status=st.just(status),
            reason=reason,
            detail=optional(st.text(NOT_JSON, max_size=80)),
            duplicate_of=request_ids if status is Status.DUPLICATE else optional(st.nothing()),
            **{
                name: strategy if status is Status.SUCCEEDED else optional(strategy)
                for name, strategy in success.items()
            },
            width=optional(integer(1, 4096)),
            height=optional(integer(1, 4096)),
            model=optional(models),
            seed=optional(integer(0, 2**32 - 1)),
            steps=optional(integer(1, 1000)),
            batch_size=optional(integer(1, 64)),
            timings=optional(timings),
            device_ms=optional(milliseconds),
            attempts=optional(integer(0, 10), nullable=False),
            worker_id=optional(st.text(NOT_JSON, max_size=80)),
            completed_at=timestamps(),
        )
    )
    if document.get("reason") in (Reason.RATE_LIMITED, Reason.OVERLOADED):
        retry = draw(optional(integer(0, 10**6)))
        if retry is not ABSENT:
            document["retry_after_ms"] = retry
    return document


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(valid_requests)
def test_every_valid_request_passes_both(document: Document) -> None:
    assert assert_agree(GenerationRequest, document) is True


@FAST
@given(valid_results())
def test_every_valid_result_passes_both(document: Document) -> None:
    assert assert_agree(GenerationResult, document) is True


# Near misses: one mutation of a valid document.

#: Characters that sit on the edge of some rule: control characters, Unicode spaces and
#: digits, path and date punctuation, letters in the wrong case.
EDGE_CHARACTERS = list("\n\r\t\x00\x01\x1f\x7f \xa0\u2028\u3000\ufeff/.-_@:+,ZzTt09aAé٣😀")
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    0.5,
    1.0,
    -0.0,
    2**32,
    2**63,
    1e308,
    "",
    " ",
    "\n",
    "..",
    "yesterday",
    "1700000000",
    ULID,
    str(uuid.UUID(int=7)),
    [],
    {},
    *Status,
    *Reason,
]


def edit_text(text: str, data: st.DataObject) -> str:
    at = data.draw(st.integers(0, len(text)))
    character = data.draw(st.sampled_from(EDGE_CHARACTERS))
    edits: dict[str, Callable[[], str]] = {
        "insert": lambda: text[:at] + character + text[at:],
        "replace": lambda: text[:at] + character + text[at + 1 :],
        "delete": lambda: text[:at] + text[at + 1 :],
        "double": lambda: text + text,
        "upper": text.upper,
        "lower": text.lower,
    }
    return edits[data.draw(st.sampled_from(sorted(edits)))]()


def edit_number(number: float, data: st.DataObject) -> float:
    edits: dict[str, Callable[[], float]] = {
        "up": lambda: number + 1,
        "down": lambda: number - 1,
        "negate": lambda: -number,
        "half": lambda: number / 2,
        "fraction": lambda: number + 0.5,
        "float": lambda: float(number),
        "huge": lambda: number * 2**32 + 1,
    }
    return edits[data.draw(st.sampled_from(sorted(edits)))]()


def mutate(document: Document, data: st.DataObject) -> Document:
    mutated = dict(document)
    field = data.draw(st.sampled_from(sorted(mutated)))
    value = mutated[field]
    kind = data.draw(st.sampled_from(["edit", "odd", "drop", "extra"]))
    if kind == "edit" and isinstance(value, str):
        mutated[field] = edit_text(value, data)
    elif kind == "edit" and isinstance(value, int | float) and not isinstance(value, bool):
        mutated[field] = edit_number(value, data)
    elif kind == "edit" and isinstance(value, dict) and value:
        mutated[field] = mutate(value, data)
    elif kind == "drop":
        del mutated[field]
    elif kind == "extra":
        name = data.draw(st.sampled_from(["colour", "Prompt", "status", "timings", "$schema"]))
        mutated[name] = data.draw(st.sampled_from(ODD_VALUES))
    else:
        mutated[field] = data.draw(st.sampled_from(ODD_VALUES))
    return mutated


@FAST
@given(valid_requests, st.data())
def test_requests_one_mutation_away_get_one_verdict(
    document: Document, data: st.DataObject
) -> None:
    assert_agree(GenerationRequest, mutate(document, data))


@FAST
@given(valid_results(), st.data())
def test_results_one_mutation_away_get_one_verdict(document: Document, data: st.DataObject) -> None:
    assert_agree(GenerationResult, mutate(document, data))


@FAST
@given(valid_results(), st.data())
def test_results_two_mutations_away_get_one_verdict(
    document: Document, data: st.DataObject
) -> None:
    # Two at once reach the cross-field rules: a status changed along with its reason.
    assert_agree(GenerationResult, mutate(mutate(document, data), data))


def test_the_generators_reach_both_verdicts() -> None:
    """A generator that only ever made valid documents, or only broken ones, would prove
    nothing: each verdict must come up often."""
    seen: dict[bool, int] = {True: 0, False: 0}

    @settings(max_examples=100, deadline=None, database=None)
    @given(valid_results(), st.data())
    def count(document: Document, data: st.DataObject) -> None:
        mutated = mutate(document, data)
        seen[assert_agree(GenerationResult, mutated)] += 1

    count()
    assert min(seen.values()) >= 10, seen


# Job events and cancellations (issue 15).


def progress(**changes: object) -> Document:
    document: Document = {
        "request_id": ULID,
        "user_id": "alice",
        "type": "progress",
        "at": "2026-11-21T10:00:02Z",
        "step": 3,
        "steps": 20,
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({}, True),
        ({"step": None, "steps": None, "worker_id": None, "status": None}, True),
        ({"type": "admitted", "queue_position": 0, "estimated_start_at": ULID}, False),
        (
            {"type": "admitted", "queue_position": 4, "estimated_start_at": "2026-11-21T10:00:09Z"},
            True,
        ),
        ({"type": "finished", "status": "expired"}, True),
        ({"type": "finished", "status": "queued"}, False),
        ({"type": "queued"}, False),
        ({"type": "Progress"}, False),
        ({"step": 0}, True),
        ({"step": 20}, True),
        ({"step": 21}, True),  # a watcher's display problem, not the wire's: no rule
        ({"step": -1}, False),
        ({"step": 3.0, "steps": 20.0}, True),
        ({"step": 3.5}, False),
        ({"step": True}, False),
        ({"steps": 0}, False),
        ({"queue_position": -1}, False),
        ({"worker_id": "w" * 256}, True),
        ({"worker_id": "w" * 257}, False),
        ({"at": "2026-11-21T10:00:02"}, False),
        ({"at": None}, False),
        ({"user_id": "al ice"}, False),
        ({"schema_version": 2}, False),
        ({"colour": "red"}, False),
    ],
)
def test_near_misses_of_events(changes: Document, accepted: bool) -> None:
    assert assert_agree(JobEvent, progress(**changes)) is accepted


def cancellation(**changes: object) -> Document:
    document: Document = {
        "request_id": ULID,
        "user_id": "alice",
        "requested_at": "2026-11-21T10:00:03.5+01:00",
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({}, True),
        ({"schema_version": 1.0}, True),
        ({"request_id": "0b5e2f0e-7d5c-4d2a-9a8e-3f1c2b4a6d7e"}, True),
        ({"request_id": "order-17"}, False),
        ({"user_id": ""}, False),
        ({"user_id": "alice\n"}, False),
        ({"requested_at": None}, False),
        ({"requested_at": "2026-02-30T10:00:00Z"}, False),
        ({"reason": "changed my mind"}, False),
    ],
)
def test_near_misses_of_cancellations(changes: Document, accepted: bool) -> None:
    assert assert_agree(CancelRequest, cancellation(**changes)) is accepted


@st.composite
def valid_events(draw: st.DrawFn) -> Document:
    steps = draw(optional(integer(1, 1000)))
    most = steps if isinstance(steps, int | float) else 10**6
    return draw(
        documents(
            schema_version=optional(st.sampled_from([1, 1.0]), nullable=False),
            request_id=request_ids,
            user_id=user_ids,
            type=st.sampled_from(EventType),
            at=timestamps(),
            step=optional(integer(0, int(most))),
            steps=st.just(steps),
            queue_position=optional(integer(0, 10**6)),
            estimated_start_at=optional(timestamps()),
            status=optional(st.sampled_from(Status)),
            worker_id=optional(st.text(NOT_JSON, max_size=80)),
        )
    )


valid_cancellations = documents(
    schema_version=optional(st.sampled_from([1, 1.0]), nullable=False),
    request_id=request_ids,
    user_id=user_ids,
    requested_at=timestamps(),
)


SOME = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SOME
@given(valid_events(), st.data())
def test_events_one_mutation_away_get_one_verdict(document: Document, data: st.DataObject) -> None:
    assert assert_agree(JobEvent, document) is True
    assert_agree(JobEvent, mutate(document, data))


@SOME
@given(valid_cancellations, st.data())
def test_cancellations_one_mutation_away_get_one_verdict(
    document: Document, data: st.DataObject
) -> None:
    assert assert_agree(CancelRequest, document) is True
    assert_agree(CancelRequest, mutate(document, data))


# API key records (issue 16).


def api_key(**changes: object) -> Document:
    document: Document = {
        "key_id": "k3y0000000id",
        "user_id": "alice",
        "name": "laptop",
        "key_sha256": "ab" * 32,
        "created_at": "2026-11-21T10:00:00Z",
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({}, True),
        ({"name": None, "revoked_at": None}, True),
        ({"revoked_at": "2026-11-22T10:00:00.5+01:00"}, True),
        ({"key_id": "K3Y0000000ID"}, False),
        ({"key_id": "k3y0000000i"}, False),
        ({"key_id": "k3y0000000id\n"}, False),
        ({"key_sha256": "AB" * 32}, False),
        ({"name": ""}, False),
        ({"name": "n" * 100}, True),
        ({"name": "n" * 101}, False),
        ({"name": "\U0001f600" * 100}, True),  # code points, not UTF-16 units
        ({"name": "build box #7, caf\u00e9"}, True),
        ({"name": "a\tb"}, False),
        ({"name": "a\x7fb"}, False),
        ({"name": "a\x85b"}, False),
        ({"name": "a\u2028b"}, True),  # a separator, not a control character
        ({"user_id": "al ice"}, False),
        ({"revoked_at": "yesterday"}, False),
        ({"token": "igk_k3y0000000id_" + "a" * 43}, False),
    ],
)
def test_near_misses_of_api_keys(changes: Document, accepted: bool) -> None:
    assert assert_agree(ApiKeyRecord, api_key(**changes)) is accepted


valid_api_keys = documents(
    schema_version=optional(st.sampled_from([1, 1.0]), nullable=False),
    key_id=st.from_regex(r"[a-z0-9]{12}", fullmatch=True),
    user_id=user_ids,
    name=optional(
        st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=100)
    ),
    key_sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    created_at=timestamps(),
    revoked_at=optional(timestamps()),
)


@SOME
@given(valid_api_keys, st.data())
def test_api_keys_one_mutation_away_get_one_verdict(
    document: Document, data: st.DataObject
) -> None:
    assert assert_agree(ApiKeyRecord, document) is True
    assert_agree(ApiKeyRecord, mutate(document, data))
