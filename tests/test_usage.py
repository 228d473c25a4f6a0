"""Metering: the totals by user and model, and `imagegen usage` on the real broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from imagegen.consumers.usage import Totals, Usage, Window, total, usage
from imagegen.infra.kafka import make_producer
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, Reason, Status, encode, new_request_id
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import RESULTS
from tests.helpers import imagegen

NOON = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)


def result(
    user: str,
    status: Status = Status.SUCCEEDED,
    *,
    model: str | None = "tiny",
    device_ms: float | None = 500.0,
    at: datetime = NOON,
    request_id: str | None = None,
) -> GenerationResult:
    fields: dict[str, object] = {}
    if status is Status.SUCCEEDED:
        fields = {
            "bucket": "images",
            "object_key": "k",
            "content_type": "image/png",
            "size_bytes": 1,
            "sha256": "ab" * 32,
        }
    elif status is Status.FAILED:
        fields = {"reason": Reason.RENDER_ERROR}
    elif status is Status.REJECTED:
        fields = {"reason": Reason.RATE_LIMITED}
    return GenerationResult(
        request_id=request_id or new_request_id(),
        user_id=user,
        status=status,
        model=model,
        device_ms=device_ms,
        completed_at=at,
        **fields,
    )


def test_totals_by_user_and_model() -> None:
    rows = usage(
        [
            result("bea", device_ms=1500),
            result("bea", device_ms=250),
            result("bea", model="sdxl", device_ms=4000),
            result("al", Status.REJECTED, model=None, device_ms=None),
            result("al", Status.FAILED, device_ms=100),
        ]
    )
    assert rows == [
        Usage("al", None, Totals(1, 0, 0.0)),
        Usage("al", "tiny", Totals(1, 0, 100.0)),
        Usage("bea", "sdxl", Totals(1, 1, 4000.0)),
        Usage("bea", "tiny", Totals(2, 2, 1750.0)),
    ]
    assert total(rows) == Totals(5, 3, 5850.0)
    assert total(rows).device_seconds == 5.85


def test_each_request_counts_once_by_its_latest_result() -> None:
    failed = result("cy", Status.FAILED, device_ms=300)
    replayed = result("cy", device_ms=700, request_id=failed.request_id)
    twice = result("cy", device_ms=200)
    rows = usage([failed, twice, replayed, twice])  # `twice` delivered twice
    assert rows == [Usage("cy", "tiny", Totals(2, 2, 900.0))]


def test_the_window_bounds_the_latest_results_completed_at() -> None:
    early = result("di", at=NOON - timedelta(hours=1))
    on_time = result("di", at=NOON)
    late = result("di", at=NOON + timedelta(hours=1))
    # Answered before the window and again inside it: it counts, once.
    moved = result("di", Status.FAILED, at=NOON - timedelta(hours=2))
    again = result("di", at=NOON + timedelta(minutes=1), request_id=moved.request_id)
    other_user = result("ed", at=NOON)
    window = Window(since=NOON, until=NOON + timedelta(hours=1), user_id="di")
    (row,) = usage([early, on_time, late, moved, again, other_user], window)
    assert row.totals.requests == 2  # since is inclusive, until exclusive


def test_a_window_needs_timezones() -> None:
    with pytest.raises(ValueError, match="needs a timezone"):
        Window(since=datetime(2031, 1, 1))


def test_usage_totals_what_was_written(settings: Settings) -> None:
    tag = new_request_id().lower()[-6:]
    ann, bob = f"ann-{tag}", f"bob-{tag}"
    now = utc_now()
    old = result(ann, at=now - timedelta(hours=3), device_ms=9000)
    written = [
        old,
        result(ann, at=now, device_ms=1200),
        result(ann, at=now, device_ms=1200, model="sdxl"),
        result(bob, Status.REJECTED, model=None, device_ms=None, at=now),
        result(bob, at=now, device_ms=300),
    ]
    producer = make_producer(settings)
    for each in [*written, written[1]]:  # one result delivered twice
        producer.produce(RESULTS, key=each.kafka_key, value=encode(each))
    assert producer.flush(10) == 0

    mine = {ann, bob}
    everything = imagegen(settings, "usage", "--json")
    assert everything.returncode == 0, everything.stderr
    rows = [row for row in json.loads(everything.stdout)["rows"] if row["user_id"] in mine]
    assert rows == [
        {"user_id": ann, "model": "sdxl", "requests": 1, "images": 1, "device_seconds": 1.2},
        {"user_id": ann, "model": "tiny", "requests": 2, "images": 2, "device_seconds": 10.2},
        {"user_id": bob, "model": None, "requests": 1, "images": 0, "device_seconds": 0.0},
        {"user_id": bob, "model": "tiny", "requests": 1, "images": 1, "device_seconds": 0.3},
    ]

    recent = imagegen(settings, "usage", "--user", ann, "--since", "1h", "--json")
    assert recent.returncode == 0, recent.stderr
    report = json.loads(recent.stdout)
    assert report["total"] == {"requests": 2, "images": 2, "device_seconds": 2.4}
    assert report["user_id"] == ann

    table = imagegen(settings, "usage", "--user", bob, "--until", f"{now + timedelta(minutes=1)}")
    assert table.returncode == 0, table.stderr
    assert "device s" in table.stdout
    assert "0.300" in table.stdout


def test_usage_refuses_a_time_it_cannot_read(settings: Settings) -> None:
    refused = imagegen(settings, "usage", "--since", "last tuesday")
    assert refused.returncode == 2
    assert "90s, 30m, 1h, 7d" in refused.stderr
