"""`imagegen.client`: its parsing and errors alone, then both clients against a real
gateway (uvicorn, with a processor and a `tiny` worker behind it)."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import httpx
import pytest

from imagegen.client import (
    ApiError,
    AsyncClient,
    Client,
    ClientConfigError,
    Conflict,
    InvalidRequest,
    Job,
    NotFound,
    Overloaded,
    RateLimited,
    Unauthorized,
    Unavailable,
    base,
)
from imagegen.client.errors import error_from
from imagegen.client.sse import EventParser
from imagegen.infra.settings import Settings
from tests import test_gateway
from tests.gateway_process import GatewayProcess, api_key

SMALL = {"width": 64, "height": 64, "steps": 2}
gateway_process = test_gateway.gateway_process  # the fixture, shared


# ---- alone ---------------------------------------------------------------------------------


def test_the_event_parser_reads_events_ids_comments_and_multi_line_data() -> None:
    parser = EventParser()
    lines = [
        ": keep-alive",
        "",
        "id: 1",
        "event: status",
        'data: {"status":',
        'data:  "queued"}',
        "",
        "event: progress",
        'data: {"step": 1, "steps": 2}',
        "",
        "id: 1000",
        "event: completed",
        "data: not json",
        "",
    ]
    events = [event for line in lines if (event := parser.feed(line)) is not None]
    assert [(e.event, e.id) for e in events] == [
        ("status", "1"),
        ("progress", "1"),  # the last id stays until another is sent
        ("completed", "1000"),
    ]
    assert events[0].data == {"status": "queued"}
    assert events[1].progress is not None and events[1].progress.step == 1
    assert events[2].data == {"text": "not json"}
    assert parser.last_event_id == "1000"


def _problem(status: int, slug: str, **extra: object) -> httpx.Response:
    body = {"type": f"urn:imagegen:problem:{slug}", "title": slug, "detail": "d", **extra}
    return httpx.Response(status, json=body)


@pytest.mark.parametrize(
    ("status", "slug", "kind"),
    [
        (401, "unauthorized", Unauthorized),
        (404, "not-found", NotFound),
        (409, "job-ended", Conflict),
        (413, "body-too-large", InvalidRequest),
        (422, "invalid-request", InvalidRequest),
        (429, "rate-limited", RateLimited),
        (503, "overloaded", Overloaded),
        (503, "unavailable", Unavailable),
        (500, "internal-error", Unavailable),
        (418, "teapot", ApiError),
    ],
)
def test_each_problem_becomes_its_exception(status: int, slug: str, kind: type) -> None:
    error = error_from(_problem(status, slug, job_id="j1"))
    assert type(error) is kind
    assert (error.status, error.slug, error.job_id) == (status, slug, "j1")


def test_a_rate_limit_says_when_to_retry_and_a_foreign_body_still_raises() -> None:
    error = error_from(_problem(429, "rate-limited", retry_after_ms=1500))
    assert isinstance(error, RateLimited) and error.retry_after_s == 1.5
    foreign = error_from(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(foreign, Unavailable) and foreign.slug is None
    assert "bad gateway" in foreign.detail


def test_a_client_without_address_or_key_names_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMAGEGEN_GATEWAY_URL", raising=False)
    monkeypatch.delenv("IMAGEGEN_API_KEY", raising=False)
    with pytest.raises(ClientConfigError, match="IMAGEGEN_GATEWAY_URL and IMAGEGEN_API_KEY"):
        Client()
    monkeypatch.setenv("IMAGEGEN_GATEWAY_URL", "http://127.0.0.1:1")
    with pytest.raises(ClientConfigError, match="set IMAGEGEN_API_KEY"):
        AsyncClient()


def test_only_a_waiting_call_waits_longer_and_asks_for_its_exact_wait() -> None:
    default = httpx.Timeout(30.0, connect=5.0)
    waiting = base.generation("a fox", None, 0.5, {})
    assert waiting.headers == {"Prefer": "wait=0.5"}
    assert base.timeout_of(waiting, default) == default  # 0.5 s + margin is within 30 s
    long_wait = base.generation("a fox", None, 60, {})
    assert base.timeout_of(long_wait, default).read == 60 + base.WAIT_MARGIN_S
    assert base.timeout_of(long_wait, default).connect == 5.0
    plain = base.generation("a fox", None, None, {})
    assert base.timeout_of(plain, default) == default and plain.headers == {}
    with pytest.raises(ValueError, match="at most 60"):
        base.generation("a fox", None, 61, {})


# ---- against a gateway ---------------------------------------------------------------------


def _user() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def test_the_client_generates_waits_downloads_and_raises_typed_errors(
    gateway_process: GatewayProcess, settings: Settings
) -> None:
    with Client(gateway_process.url, api_key(settings, _user())) as client:
        job = _first_job(client)
        ended = client.wait(client.generate("a fox", **SMALL).id, timeout_s=240)
        assert ended.status == "succeeded" and ended.result is not None
        image = client.download(ended.id)
        assert hashlib.sha256(image).hexdigest() == ended.result.sha256
        assert [j.id for j in client.all_jobs(page_size=1)] == [ended.id, job.id]
        events = list(client.events(ended.id))
        assert events[-1].event == "completed" and events[-1].job is not None
        assert events[-1].job.status == "succeeded"
        with pytest.raises(Conflict):
            client.cancel(ended.id)
        with pytest.raises(NotFound):
            client.job(str(uuid.uuid4()))
        with pytest.raises(InvalidRequest) as invalid:
            client.generate("a fox", width=7)
        assert "width" in str(invalid.value.problem.get("errors"))
    stranger = Client(gateway_process.url, "igk_aaaaaaaaaaaa_" + "b" * 43)
    with stranger, pytest.raises(Unauthorized):
        stranger.jobs()


def _first_job(client: Client) -> Job:
    """The first job of a new user, once the gateway's key book knows the key."""
    for _ in range(300):
        try:
            return client.generate("a hare", idempotency_key="first", wait_s=60, **SMALL)
        except Unauthorized:  # the key reaches the book about one fetch wait after minting
            time.sleep(0.1)
    raise AssertionError("the gateway never knew the key")


def test_the_async_client_does_the_same(
    gateway_process: GatewayProcess, settings: Settings
) -> None:
    async def scenario() -> None:
        token = api_key(settings, _user())
        async with AsyncClient(gateway_process.url, token) as client:
            for _ in range(300):
                try:
                    job = await client.generate("an owl", wait_s=60, **SMALL)
                    break
                except Unauthorized:
                    await asyncio.sleep(0.1)
            ended = await client.wait(job.id, timeout_s=240)
            assert ended.status == "succeeded" and ended.result is not None
            image = await client.download(ended.id)
            assert hashlib.sha256(image).hexdigest() == ended.result.sha256
            kinds = [event.event async for event in client.events(ended.id)]
            assert kinds[-1] == "completed"
            assert [j.id async for j in client.all_jobs()] == [ended.id]
            with pytest.raises(NotFound):
                await client.image_url(str(uuid.uuid4()))

    asyncio.run(scenario())
