"""Webhooks end to end: a job submitted through the gateway, rendered by a worker, and
delivered by the deliverer to a receiver, which gets what `GET /v1/images/jobs/{id}` shows."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from imagegen.gateway.problems import Problem
from imagegen.gateway.submissions import parse_body, refuse_private_webhook
from imagegen.infra.settings import Settings
from imagegen.webhooks import verify
from tests import test_gateway
from tests.conftest import settings_env
from tests.gateway_process import GatewayProcess, api_key
from tests.processes import Service
from tests.receivers import Received, Receiver
from tests.test_webhooks import _secret

gateway_process = test_gateway.gateway_process  # the fixture, shared
#: Whatever the document holds, but for the image URL, signed anew for each reader.
SIGNED = ("url", "url_expires_at")


def test_the_receiver_gets_the_job_as_the_api_shows_it(
    settings: Settings, gateway_process: GatewayProcess, tmp_path: Path
) -> None:
    """Through `imagegen webhooks`, as deployed."""
    user = f"w-{uuid.uuid4().hex[:10]}"
    secret = _secret(settings, user)
    deliverer = Service(["webhooks"], settings_env(settings), tmp_path / "webhooks.log")
    deliverer.start()
    try:
        with (
            Receiver() as receiver,
            test_gateway.client(gateway_process.url, api_key(settings, user)) as http,
        ):
            assert test_gateway._eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
            submitted = http.post(
                "/v1/images/generations",
                json={
                    "prompt": "a lighthouse",
                    "width": 64,
                    "height": 64,
                    "steps": 3,
                    "webhook_url": receiver.url,
                    "webhook_events": ["status", "progress", "completed"],
                },
            )
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]

            def ended(deliveries: list[Received]) -> list[dict]:
                jobs = [verify(d.body, d.headers, secret) for d in deliveries]
                return [job for job in jobs if job["status"] not in ("queued", "running")]

            (delivered,) = ended(receiver.wait_until(lambda got: bool(ended(got)), timeout_s=240))
            shown = http.get(f"/v1/images/jobs/{job_id}").json()

            # The processor's own answers are told too: this one costs more than any burst.
            too_big = {"prompt": "a city", "width": 2048, "height": 2048, "steps": 100}
            refused = http.post(
                "/v1/images/generations", json={**too_big, "webhook_url": receiver.url}
            )
            assert refused.status_code == 422, refused.text
            rejected = ended(receiver.wait_until(lambda got: len(ended(got)) == 2))[1]
    finally:
        # Also after a failure: a deliverer left in the group would take later tests' records.
        stopped = deliverer.stop()
    assert stopped == 0, deliverer.log.read_text()[-3000:]
    assert delivered["status"] == "succeeded"
    assert rejected["status"] == "rejected" and rejected["id"] == refused.json()["job_id"]
    assert rejected["error"]["reason"] == "exceeds_burst"
    assert _unsigned(delivered) == _unsigned(shown)
    statuses = {job["status"] for job in _jobs(receiver, secret)}
    assert {"queued", "running", "succeeded"} <= statuses
    steps = [job["progress"]["step"] for job in _jobs(receiver, secret) if job["progress"]]
    assert steps and max(steps) == 3


def test_the_gateway_refuses_a_webhook_it_would_never_deliver() -> None:
    def problems(url: str) -> list[dict[str, object]]:
        body = f'{{"prompt": "a fox", "webhook_url": "{url}"}}'.encode()
        with pytest.raises(Problem) as refused:
            parse_body(body, "ann", None, 60.0, allow_private_webhooks=False)
        return refused.value.extensions["errors"]

    for url in ("http://hooks.example/a", "https://127.0.0.1/a", "https://10.1.2.3/a"):
        (error,) = problems(url)
        assert error["loc"] == ["body", "webhook_url"]
        assert "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE" in error["msg"]
    named = parse_body(
        b'{"prompt": "a fox", "webhook_url": "https://localhost/a"}', "ann", None, 60.0
    )
    with pytest.raises(Problem):
        asyncio.run(refuse_private_webhook(named.request, allow_private=False))


def _jobs(receiver: Receiver, secret: str) -> list[dict]:
    return [verify(d.body, d.headers, secret) for d in receiver.received()]


def _unsigned(job: dict) -> dict:
    result = job.get("result") or {}
    return {**job, "result": {k: v for k, v in result.items() if k not in SIGNED}}
