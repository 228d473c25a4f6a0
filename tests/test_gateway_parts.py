"""The gateway's pure parts, without a stack: body checks, Prefer, event ids, problems,
the job view."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import typer
from typer.testing import CliRunner

from imagegen.cli.gateway import gateway
from imagegen.gateway.events_stream import implied, last_event_id
from imagegen.gateway.hub import LiveState
from imagegen.gateway.job_store import JobRecord
from imagegen.gateway.problems import SLUGS, Problem
from imagegen.gateway.submissions import parse_body, prefer_wait
from imagegen.gateway.views import job_view
from imagegen.schemas import GenerationResult, Reason, Status

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
    return job_view(_record(), result, live, lambda _r: "http://signed", 600, NOW)


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


def test_the_gateway_command_takes_a_host_and_a_port() -> None:
    app = typer.Typer()
    app.command()(gateway)
    shown = CliRunner().invoke(app, ["--help"])
    assert shown.exit_code == 0, shown.output
    assert "--host" in shown.output and "--port" in shown.output
