"""The gateway's pure parts, without a stack: body checks, Prefer, event ids, problems,
the job view."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException
from typer.testing import CliRunner

from imagegen.cli.gateway import gateway
from imagegen.gateway import problems
from imagegen.gateway.events_stream import implied, last_event_id, wants_events
from imagegen.gateway.hub import LiveState, _apply
from imagegen.gateway.job_store import JobRecord
from imagegen.gateway.problems import SLUGS, Problem
from imagegen.gateway.submissions import parse_body, prefer_wait
from imagegen.gateway.views import job_view
from imagegen.schemas import EventType, GenerationResult, JobEvent, Reason, Status

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def parse(body: object, key: str | None = None):
    return parse_body(json.dumps(body).encode(), "alice", key, 600.0)


def test_a_body_becomes_the_users_request_with_a_deadline() -> None:
    submission = parse({"prompt": "a fox", "width": 64, "height": 64, "ttl_s": 30})
    request = submission.request
    assert (request.user_id, request.width, request.prompt) == ("alice", 64, "a fox")
    assert request.expires_at is not None
    assert (request.expires_at - request.submitted_at).total_seconds() == pytest.approx(30)
    default = parse({"prompt": "a fox"}).request
    assert default.expires_at is not None


def test_an_idempotency_key_fixes_the_id_and_the_body_hash_is_canonical() -> None:
    one = parse({"prompt": "a fox", "seed": 1}, key="k1")
    two = parse_body(b'{"seed": 1,   "prompt": "a fox"}', "alice", "k1", 600.0)
    assert one.request.request_id == two.request.request_id
    assert one.body_sha256 == two.body_sha256
    assert parse({"prompt": "a fox"}, key="k2").request.request_id != one.request.request_id
    other_user = parse_body(b'{"prompt": "a fox", "seed": 1}', "bob", "k1", 600.0)
    assert other_user.request.request_id != one.request.request_id


def test_a_body_that_spells_out_the_defaults_hashes_as_one_that_leaves_them_out() -> None:
    terse = parse({"prompt": "a fox"}, key="k1")
    spelled = parse(
        {
            "prompt": "a fox",
            "model": "tiny",
            "steps": 25,
            "width": 512,
            "negative_prompt": None,
            "seed": None,
            "priority": "interactive",
            "ttl_s": 600,
        },
        key="k1",
    )
    assert spelled.body_sha256 == terse.body_sha256
    assert parse({"prompt": "a fox", "steps": 24}, key="k1").body_sha256 != terse.body_sha256
    assert parse({"prompt": "a fox", "ttl_s": 60}, key="k1").body_sha256 != terse.body_sha256
    # One time, two spellings.
    zulu = parse({"prompt": "a fox", "expires_at": "2099-01-01T00:00:00Z"}, key="k1")
    offset = parse({"prompt": "a fox", "expires_at": "2099-01-01T01:00:00+01:00"}, key="k1")
    assert zulu.body_sha256 == offset.body_sha256 != terse.body_sha256


def test_a_bad_idempotency_key_is_listed_beside_the_bad_fields() -> None:
    with pytest.raises(Problem) as raised:
        parse({"prompt": "a fox", "steps": 101, "colour": "red"}, key="a\tb")
    locs = [error["loc"] for error in raised.value.extensions["errors"]]
    assert ["header", "Idempotency-Key"] in locs
    assert ["body", "steps"] in locs and ["body", "colour"] in locs
    with pytest.raises(Problem) as alone:
        parse({"prompt": "a fox"}, key="a\tb")
    assert [e["loc"] for e in alone.value.extensions["errors"]] == [["header", "Idempotency-Key"]]


def test_a_bare_http_status_keeps_its_status_as_a_problem() -> None:
    app = FastAPI()
    problems.install(app)

    @app.get("/status/{code}")
    async def status(code: int) -> None:
        raise HTTPException(code, detail=f"status {code}")

    with TestClient(app) as http:
        for code, slug in [
            (400, "bad-request"),
            (403, "forbidden"),
            (409, "http-409"),
            (418, "http-418"),
            (502, "http-502"),
            (404, "not-found"),
        ]:
            answer = http.get(f"/status/{code}")
            assert answer.status_code == code, answer.text
            assert answer.headers["content-type"] == problems.MEDIA_TYPE
            assert answer.json()["type"] == problems.TYPE_PREFIX + slug
            assert answer.json()["status"] == code
        wrong_method = http.post("/status/400")
        assert wrong_method.status_code == 405
        assert wrong_method.json()["type"] == problems.TYPE_PREFIX + "method-not-allowed"
        assert wrong_method.headers["allow"] == "GET"
        assert http.get("/nowhere").json()["type"] == problems.TYPE_PREFIX + "not-found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a fox", "user_id": "mallory"}, "user_id"),
        ({"prompt": "a fox", "ttl_s": 0}, "ttl_s"),
        ({"prompt": "a fox", "ttl_s": True}, "ttl_s"),
        ({"prompt": "a fox", "ttl_s": 5, "expires_at": "2099-01-01T00:00:00Z"}, "ttl_s"),
        ({"prompt": " "}, "prompt"),
        ({"prompt": "a fox", "steps": 101}, "steps"),
        ({"prompt": "a fox", "idempotency_key": "x"}, "idempotency_key"),
    ],
)
def test_a_bad_body_is_invalid_request_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(Problem) as raised:
        parse(body)
    assert raised.value.status == 422 and raised.value.slug == "invalid-request"
    assert ["body", field] in [error["loc"] for error in raised.value.extensions["errors"]]


def test_prefer_wait_takes_0_to_60_seconds_and_ignores_the_rest() -> None:
    assert prefer_wait("wait=10") == 10
    assert prefer_wait("respond-async, wait=2.5") == 2.5
    assert prefer_wait("return=minimal") is None
    assert prefer_wait("wait=0") is None and prefer_wait("wait=61") is None
    assert prefer_wait("wait=soon") is None and prefer_wait(None) is None


def test_a_retry_after_is_whole_seconds_rounded_up() -> None:
    problem = Problem("rate-limited", "slow down", retry_after_ms=1001)
    assert problem.headers["Retry-After"] == "2" and problem.status == 429
    assert Problem("rate-limited", "x", retry_after_ms=1).headers["Retry-After"] == "1"
    with pytest.raises(ValueError, match="unknown problem slug"):
        Problem("no-such-slug", "x")
    assert {status for status, _ in SLUGS.values()} >= {401, 404, 409, 413, 422, 429, 500, 503}


def _record() -> JobRecord:
    request = parse({"prompt": "a fox", "steps": 10}).request
    return JobRecord(request=request, created_at=request.submitted_at, body_sha256="0" * 64)


def _view(live: LiveState | None, result: GenerationResult | None = None):
    return job_view(_record().request, result, live, lambda _r: "http://signed", 600, NOW)


def test_event_ids_follow_the_jobs_state() -> None:
    queued = _view(LiveState(admitted=True, queue_position=3))
    assert queued.status == "queued" and queued.queue_position == 3
    assert [(i, n) for i, n, _ in implied(queued)] == [(1, "status")]
    running = _view(LiveState(admitted=True, started_at=NOW, step=4, steps=10))
    assert running.status == "running" and running.queue_position is None
    assert [(i, n) for i, n, _ in implied(running)] == [(2, "status"), (6, "progress")]
    record = _record()
    result = GenerationResult(
        request_id=record.request.request_id,
        user_id="alice",
        status=Status.REJECTED,
        reason=Reason.RATE_LIMITED,
        retry_after_ms=500,
        completed_at=NOW,
    )
    ended = _view(None, result)
    assert (ended.status, ended.error and ended.error.retry_after_ms) == ("rejected", 500)
    assert [(i, n) for i, n, _ in implied(ended)] == [(1000, "completed")]
    assert last_event_id("6") == 6 and last_event_id("x") == 0 and last_event_id(None) == 0


def _event(type_: EventType) -> JobEvent:
    return JobEvent(request_id=_record().request.request_id, user_id="alice", type=type_, at=NOW)


def test_a_job_the_hub_saw_only_ending_is_read_from_the_store() -> None:
    only_ended = _apply(LiveState(), _event(EventType.FINISHED))
    assert not only_ended.result_known  # before, it read `queued` with no result, for good
    on_its_way = _apply(LiveState(), _event(EventType.ADMITTED))
    assert on_its_way.result_known  # the hub will see the result: no store read
    assert not _apply(on_its_way, _event(EventType.FINISHED)).result_known


def test_the_event_stream_is_asked_for_by_name() -> None:
    assert wants_events("text/event-stream")
    assert wants_events("application/json;q=0.5, Text/Event-Stream; q=1")
    assert not wants_events("text/event-stream;q=0") and not wants_events("*/*")
    assert not wants_events(None) and not wants_events("application/json")


def test_the_gateway_command_takes_a_host_and_a_port() -> None:
    app = typer.Typer()
    app.command()(gateway)
    shown = CliRunner().invoke(app, ["--help"])
    assert shown.exit_code == 0, shown.output
    assert "--host" in shown.output and "--port" in shown.output
