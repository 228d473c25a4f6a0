"""The wire contract: round trips, rejections that name the field, and generated JSON Schema."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagegen.schemas import (
    MAX_MESSAGE_BYTES,
    ApiKeyRecord,
    GenerationRequest,
    GenerationResult,
    Reason,
    Status,
    Timings,
    decode,
    encode,
    hash_key,
    key_id_of,
    mint_key,
)
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.export import CONTRACTS, JSON_DIR, render
from imagegen.schemas.fields import DATE_TIME_PATTERN, PATTERN_HELP

REQUEST_SCHEMA = json.loads((JSON_DIR / "generation_request.v1.json").read_text())


def valid_fields(**changes: object) -> dict:
    fields = {
        "schema_version": 1,
        "request_id": "01JD8X4ZQ6V1N3K7M9P2R5T8W0",
        "user_id": "alice@example.com",
        "prompt": "a lighthouse at dusk",
        "width": 512,
        "height": 768,
        "steps": 20,
        "guidance_scale": 7.0,
        "submitted_at": "2026-11-21T10:00:00Z",
    }
    fields.update(changes)
    return fields


def as_bytes(fields: dict) -> bytes:
    return json.dumps(fields).encode()


def test_json_schema_files_are_current() -> None:
    for filename, model in CONTRACTS.items():
        assert (JSON_DIR / filename).read_text() == render(model), (
            f"schemas/json/{filename} is stale: run `make schemas`"
        )


def test_new_fills_in_request_id_and_submitted_at() -> None:
    first = GenerationRequest.new(user_id="u1", prompt="a cat")
    second = GenerationRequest.new(user_id="u1", prompt="a cat")
    assert first.request_id != second.request_id
    assert first.submitted_at.tzinfo is not None
    assert first.model == "tiny" and first.output_format == "png"
    assert first.kafka_key == b"u1"


def test_request_round_trips_and_matches_the_published_schema() -> None:
    request = GenerationRequest.new(
        user_id="bob",
        prompt="x",
        negative_prompt="blurry",
        seed=2**32 - 1,
        idempotency_key="order-17",
        output_format="webp",
    )
    data = encode(request)
    assert decode(GenerationRequest, data) == request
    jsonschema.validate(json.loads(data), REQUEST_SCHEMA)


def test_submitted_at_in_another_offset_becomes_utc() -> None:
    plus_two = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    request = GenerationRequest.new(user_id="u", prompt="p", submitted_at=plus_two)
    assert request.submitted_at == datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert b'"submitted_at":"2026-01-01T10:00:00Z"' in encode(request)


def test_submitted_at_on_the_wire_in_another_offset_becomes_utc() -> None:
    fields = valid_fields(submitted_at="2026-01-01T12:00:00.25+02:00")
    request = decode(GenerationRequest, as_bytes(fields))
    assert request.submitted_at == datetime(2026, 1, 1, 10, 0, 0, 250_000, tzinfo=UTC)


def test_a_datetime_out_of_range_in_utc_is_an_invalid_message() -> None:
    # Python's datetime ends at year 1: converting this one to UTC overflows.
    first_hour = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    with pytest.raises(InvalidMessage, match="submitted_at: is out of range"):
        GenerationRequest.new(user_id="u", prompt="p", submitted_at=first_hour)


def test_every_pattern_in_the_schemas_has_plain_words() -> None:
    def patterns(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
            return found + [p for value in node.values() for p in patterns(value)]
        if isinstance(node, list):
            return [p for value in node for p in patterns(value)]
        return []

    found = {p for model in CONTRACTS.values() for p in patterns(model.model_json_schema())}
    # A date-time's own validator explains it; every other pattern needs words of its own.
    assert found - {DATE_TIME_PATTERN.pattern} <= PATTERN_HELP.keys()
    assert len(found) == len(PATTERN_HELP) + 1


def test_uuid_request_ids_are_accepted() -> None:
    fields = valid_fields(request_id="0b5e2f0e-7d5c-4d2a-9a8e-3f1c2b4a6d7e")
    assert decode(GenerationRequest, as_bytes(fields)).request_id == fields["request_id"]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("request_id", "not-an-id", "UUID"),
        ("request_id", "0B5E2F0E-7D5C-4D2A-9A8E-3F1C2B4A6D7E", "lowercase"),
        ("user_id", "", "1-128 characters"),
        ("user_id", "a" * 129, "1-128 characters"),
        ("user_id", "alice/../bob", "1-128 characters"),
        ("prompt", "", "at least 1"),
        ("prompt", "   ", "non-whitespace"),
        ("prompt", "x" * 2001, "at most 2000"),
        ("prompt", "bad\u0000byte", "NUL"),
        ("negative_prompt", "y" * 2001, "at most 2000"),
        ("model", "../etc/passwd", "starting with a letter or digit"),
        ("model", "org/../secret", "'..'"),
        ("width", 100, "multiple of 8"),
        ("width", 56, "greater than or equal to 64"),
        ("height", 2056, "less than or equal to 2048"),
        ("width", "512", "valid integer"),
        ("steps", 0, "greater than or equal to 1"),
        ("steps", 101, "less than or equal to 100"),
        ("steps", True, "valid integer"),
        ("guidance_scale", 31, "less than or equal to 30"),
        ("guidance_scale", -1, "greater than or equal to 0"),
        ("seed", -1, "greater than or equal to 0"),
        ("seed", 2**32, "less than or equal to"),
        ("idempotency_key", "", "at least 1"),
        ("idempotency_key", "a\nb", "control characters"),
        ("output_format", "gif", "png"),
        ("submitted_at", "2026-11-21T10:00:00", "timezone"),
        ("submitted_at", "2026-02-30T10:00:00Z", "calendar date"),
        ("request_id", "01JD8X4ZQ6V1N3K7M9P2R5T8W0\n", "ULID"),
        ("schema_version", True, "not a boolean"),
        ("schema_version", 2, "unsupported version 2"),
        ("colour", "red", "unknown field"),
    ],
)
def test_bad_fields_are_rejected_by_name(field: str, value: object, fragment: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(GenerationRequest, as_bytes(valid_fields(**{field: value})))
    assert field in dict(caught.value.problems), caught.value.problems
    assert fragment in dict(caught.value.problems)[field]
    assert field in str(caught.value)


def test_infinite_guidance_is_rejected() -> None:
    data = as_bytes(valid_fields()).replace(b'"guidance_scale": 7.0', b'"guidance_scale": 1e999')
    with pytest.raises(InvalidMessage, match="guidance_scale"):
        decode(GenerationRequest, data)


def test_missing_required_fields_are_listed() -> None:
    fields = valid_fields()
    del fields["prompt"], fields["user_id"]
    with pytest.raises(InvalidMessage) as caught:
        decode(GenerationRequest, as_bytes(fields))
    assert dict(caught.value.problems) == {"prompt": "required", "user_id": "required"}


@pytest.mark.parametrize(
    "data",
    [None, b"", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'"text"', b"{", b"\x00" * 10],
)
def test_garbage_is_rejected_whole(data: bytes | None) -> None:
    with pytest.raises(InvalidMessage, match="invalid GenerationRequest"):
        decode(GenerationRequest, data)


def test_oversized_messages_are_rejected_before_parsing() -> None:
    data = as_bytes(valid_fields(prompt="x" * (MAX_MESSAGE_BYTES + 1)))
    with pytest.raises(InvalidMessage, match=f"the limit is {MAX_MESSAGE_BYTES}"):
        decode(GenerationRequest, data)


# Property-based: every well-formed request round-trips and satisfies the published schema;
# any other input is refused with InvalidMessage and nothing else.

sides = st.integers(8, 256).map(lambda n: n * 8)
text = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), min_size=1, max_size=50)
requests = st.builds(
    GenerationRequest.new,
    user_id=st.from_regex(r"[A-Za-z0-9._@-]{1,128}", fullmatch=True),
    prompt=text.filter(str.strip),
    negative_prompt=st.none() | text,
    width=sides,
    height=sides,
    steps=st.integers(1, 100),
    guidance_scale=st.floats(0, 30, allow_nan=False),
    seed=st.none() | st.integers(0, 2**32 - 1),
    output_format=st.sampled_from(["png", "jpeg", "webp"]),
)


@given(requests)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_valid_request_round_trips(request: GenerationRequest) -> None:
    data = encode(request)
    assert decode(GenerationRequest, data) == request
    jsonschema.validate(json.loads(data), REQUEST_SCHEMA)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(field=st.sampled_from(sorted(GenerationRequest.model_fields)), value=json_values)
def test_any_single_field_change_is_accepted_or_named(field: str, value: object) -> None:
    try:
        request = decode(GenerationRequest, as_bytes(valid_fields(**{field: value})))
    except InvalidMessage as exc:
        # A list's error names its item: webhook_events.0
        assert {name.partition(".")[0] for name, _ in exc.problems} == {field}
    else:
        jsonschema.validate(json.loads(encode(request)), REQUEST_SCHEMA)


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_invalid_message(data: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        assert isinstance(decode(GenerationRequest, data), GenerationRequest)


def succeeded(**changes: object) -> dict:
    fields = {
        "request_id": "01JD8X4ZQ6V1N3K7M9P2R5T8W0",
        "user_id": "alice",
        "status": Status.SUCCEEDED,
        "bucket": "images",
        "object_key": "v1/alice/01JD8X4ZQ6V1N3K7M9P2R5T8W0.png",
        "content_type": "image/png",
        "size_bytes": 1234,
        "sha256": "ab" * 32,
        "timings": Timings(render_ms=120.5, total_ms=300.0),
        "attempts": 1,
        "completed_at": datetime.now(UTC),
    }
    fields.update(changes)
    return fields


def test_result_round_trips() -> None:
    result = GenerationResult(**succeeded())
    assert decode(GenerationResult, encode(result)) == result
    assert result.kafka_key == result.request_id.encode()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"object_key": None}, "needs object_key"),
        ({"reason": Reason.RENDER_ERROR}, "has no reason"),
        ({"status": Status.FAILED}, "needs a reason"),
        ({"status": Status.REJECTED, "reason": None}, "needs a reason"),
        ({"status": Status.DUPLICATE}, "duplicate_of"),
        ({"duplicate_of": "01JD8X4ZQ6V1N3K7M9P2R5T8W1"}, "duplicate_of"),
        (
            {"status": Status.FAILED, "reason": Reason.RENDER_ERROR, "retry_after_ms": 5},
            "retry_after_ms",
        ),
    ],
)
def test_result_fields_must_match_status(changes: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        GenerationResult(**succeeded(**changes))


def test_rate_limited_and_duplicate_results_are_valid() -> None:
    now = datetime.now(UTC)
    limited = GenerationResult(
        request_id="01JD8X4ZQ6V1N3K7M9P2R5T8W0",
        user_id="u",
        status=Status.REJECTED,
        reason=Reason.RATE_LIMITED,
        retry_after_ms=250,
        completed_at=now,
    )
    duplicate = GenerationResult(
        request_id="01JD8X4ZQ6V1N3K7M9P2R5T8W0",
        user_id="u",
        status=Status.DUPLICATE,
        duplicate_of="01JD8X4ZQ6V1N3K7M9P2R5T8W1",
        completed_at=now,
    )
    for result in (limited, duplicate):
        assert decode(GenerationResult, encode(result)) == result


def test_an_api_key_record_matches_the_published_schema() -> None:
    token = mint_key()
    record = ApiKeyRecord.new(
        key_id=key_id_of(token), user_id="alice", name="ci", key_sha256=hash_key(token)
    )
    schema = json.loads((JSON_DIR / "api_key.v1.json").read_text())
    for each in (record, record.revoked()):
        jsonschema.validate(json.loads(encode(each)), schema)
        assert decode(ApiKeyRecord, encode(each)) == each


def test_a_webhook_is_sent_on_completed_unless_the_request_names_its_events() -> None:
    plain = GenerationRequest.new(**valid_fields(webhook_url="https://hooks.example/a"))
    assert plain.webhook_wants("completed") and not plain.webhook_wants("progress")
    chosen = GenerationRequest.new(
        **valid_fields(webhook_url="https://hooks.example/a", webhook_events=["progress"])
    )
    assert chosen.webhook_wants("progress") and not chosen.webhook_wants("completed")
    assert not GenerationRequest.new(**valid_fields()).webhook_wants("completed")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"webhook_events": ["completed"]}, "needs a webhook_url"),
        (
            {"webhook_url": "https://hooks.example/a", "webhook_events": ["status", "status"]},
            "lists an event twice",
        ),
        ({"webhook_url": "ftp://hooks.example/a"}, "must be an https:// URL"),
        ({"webhook_url": "https://hooks.example/a b"}, "must be an https:// URL"),
    ],
)
def test_a_bad_webhook_is_named(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidMessage, match=problem):
        decode(GenerationRequest, as_bytes(valid_fields(**changes)))


OWN_UPLOAD = "uploads/user=alice/" + "0f" * 32 + ".png"


@pytest.mark.parametrize(
    ("changes", "strength"),
    [
        ({}, None),
        ({"task": "edit", "image": OWN_UPLOAD}, 0.8),
        ({"task": "edit", "image": OWN_UPLOAD, "strength": 0.35}, 0.35),
        ({"task": "inpaint", "image": OWN_UPLOAD, "mask": OWN_UPLOAD, "strength": 1}, 1.0),
    ],
)
def test_each_task_takes_its_inputs_and_the_schema_agrees(
    changes: dict[str, object], strength: float | None
) -> None:
    request = decode(GenerationRequest, as_bytes(valid_fields(**changes)))
    assert request.edit_strength == strength
    assert request.inputs == [k for k in (changes.get("image"), changes.get("mask")) if k]
    jsonschema.validate(json.loads(encode(request)), REQUEST_SCHEMA)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"image": OWN_UPLOAD}, "image: belongs to the tasks edit and inpaint"),
        ({"strength": 0.5}, "strength: belongs to the tasks edit and inpaint"),
        ({"task": "edit"}, "image: is needed by task edit"),
        ({"task": "edit", "image": OWN_UPLOAD, "mask": OWN_UPLOAD}, "mask: belongs to the task"),
        ({"task": "inpaint", "image": OWN_UPLOAD}, "mask: is needed by task inpaint"),
        ({"task": "edit", "image": OWN_UPLOAD, "strength": 0}, "strength"),
        ({"task": "edit", "image": OWN_UPLOAD, "strength": 1.5}, "strength"),
        ({"task": "edit", "image": "uploads/user=alice/../x.png"}, "an upload's object key"),
        ({"task": "edit", "image": "images/user=alice/x.png"}, "an upload's object key"),
        ({"task": "draw"}, "task"),
    ],
)
def test_a_bad_edit_is_named_and_the_schema_refuses_it_too(
    changes: dict[str, object], problem: str
) -> None:
    with pytest.raises(InvalidMessage, match=problem):
        decode(GenerationRequest, as_bytes(valid_fields(**changes)))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(valid_fields(**changes), REQUEST_SCHEMA)
