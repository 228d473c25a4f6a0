"""The HTTP gateway as a real uvicorn process, against the embedded stack with a real
processor and a real `tiny` worker: keys, submissions and their decisions, jobs, images,
idempotency, rate limits, cancellation, listing, the event stream, and a store outage.

One processor, worker and gateway serve the whole module; every test has users of its own,
so that each starts with a full token bucket (the processor's burst is low, 3, for the
rate-limit test).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from imagegen.gateway.job_store import JobRecord, JobStore
from imagegen.infra.kafka import make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.schemas import (
    EventType,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    Status,
    decode,
    encode,
)
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import EVENTS, REQUESTS, RESULTS
from tests.conftest import settings_env
from tests.gateway_process import GatewayProcess, api_key
from tests.helpers import read_topic
from tests.processes import Service
from tests.proxy import Proxy

SMALL = {"width": 64, "height": 64, "steps": 2}
SLOW = {"width": 256, "height": 256, "steps": 100}
PROBLEM = "application/problem+json"
WAIT_S = 240
#: The one user whose bucket refills quickly: a token a second, one at most.
REFILLING = "gw-refilling"


@pytest.fixture(scope="module")
def gateway_process(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway, with a processor and a worker behind it."""
    logs = tmp_path_factory.mktemp("gateway")
    env = {
        **settings_env(settings),
        "IMAGEGEN_RATE_USER_BURST": "3",
        "IMAGEGEN_RATE_USER_PER_S": "0.01",
        "IMAGEGEN_RATE_USER_OVERRIDES": json.dumps({REFILLING: {"per_s": 1, "burst": 1}}),
    }
    processor = Service(["processor"], env, logs / "processor.log")
    worker = Service(["worker", "--device", "cpu"], env, logs / "worker.log")
    processor.start()
    worker.start()
    try:
        with GatewayProcess(settings, logs / "gateway.log", gateway_intake_wait_s="30") as process:
            yield process
    finally:
        worker.stop()
        processor.stop()


@pytest.fixture
def gateway(gateway_process: GatewayProcess) -> str:
    """The gateway's base URL."""
    return gateway_process.url


def user() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


def client(url: str, token: str | None) -> httpx.Client:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=url, headers=headers, timeout=WAIT_S)


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:imagegen:problem:{slug}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["instance"] == response.request.url.path
    return body


def body(**fields: object) -> dict:
    return {"prompt": "a red fox in snow", **SMALL, **fields}


# ---- keys ----------------------------------------------------------------------------------


def test_every_route_needs_a_live_key(gateway: str, settings: Settings) -> None:
    from imagegen.producers.api_keys import KeyRegistry
    from imagegen.schemas.api_keys import key_id_of

    for token in (None, "igk_nonsense", "igk_aaaaaaaaaaaa_" + "b" * 43):
        with client(gateway, token) as http:
            answer = http.get("/v1/images/jobs")
            assert_problem(answer, 401, "unauthorized")
            assert answer.headers["www-authenticate"] == "Bearer"
    with httpx.Client(base_url=gateway) as http:
        answer = http.get("/v1/images/jobs", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert_problem(answer, 401, "unauthorized")

    token = api_key(settings, user())
    with client(gateway, token) as http:
        assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
        key_id = key_id_of(token)
        assert key_id is not None
        KeyRegistry(settings).revoke(key_id)
        assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 401)


def _eventually(check: object, timeout_s: float = 30.0) -> bool:
    """Whether `check()` holds within `timeout_s`: a key reaches every gateway's book about
    one fetch wait after it is published, and nothing outside the gateway says when."""
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def http(gateway: str, settings: Settings) -> Iterator[httpx.Client]:
    """A client of a new user's, whose key the gateway already knows."""
    with client(gateway, api_key(settings, user())) as http:
        assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
        yield http


# ---- submitting and reading ----------------------------------------------------------------


def test_a_submission_is_202_with_its_location_and_ends_with_an_image(
    http: httpx.Client,
) -> None:
    submitted = http.post("/v1/images/generations", json=body(seed=7))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert submitted.headers["location"] == f"/v1/images/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert job["request"]["seed"] == 7 and job["request"]["width"] == 64
    assert job["result"] is None and job["error"] is None and job["expires_at"]

    waited = http.get(submitted.headers["location"])
    assert waited.status_code == 200
    done = _wait_until_ended(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["finished_at"] and done["result"]["content_type"] == "image/png"

    image = http.get(f"/v1/images/jobs/{job['id']}/image")
    assert image.status_code == 307
    assert "X-Amz-Signature" in image.headers["location"]
    with httpx.Client() as anyone:  # the URL needs no key
        png = anyone.get(image.headers["location"])
    assert png.status_code == 200
    assert hashlib.sha256(png.content).hexdigest() == done["result"]["sha256"]
    assert len(png.content) == done["result"]["size_bytes"]


def _wait_until_ended(http: httpx.Client, job_id: str) -> dict:
    """The job once it ended, read from its event stream (which ends with `completed`)."""
    events = list(_events(http, job_id))
    name, _event_id, data = events[-1]
    assert name == "completed", events
    return data


def _events(
    http: httpx.Client, job_id: str, last_event_id: int | None = None, path: str = "/events"
) -> Iterator[tuple[str, int, dict]]:
    """The job's server-sent events, at `/events` or (with `path=""`) at the job's URL."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    with http.stream("GET", f"/v1/images/jobs/{job_id}{path}", headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in stream.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                yield fields["event"], int(fields["id"]), json.loads(fields["data"])
                fields = {}


def test_prefer_wait_answers_200_with_the_ended_job(http: httpx.Client) -> None:
    answer = http.post("/v1/images/generations", json=body(), headers={"Prefer": "wait=60"})
    assert answer.status_code in (200, 202), answer.text
    assert answer.headers["preference-applied"] == "wait=60"
    if answer.status_code == 200:
        assert answer.json()["status"] == "succeeded"


def test_bad_bodies_are_422_naming_each_field_and_publish_nothing(
    http: httpx.Client, settings: Settings
) -> None:
    cases = {
        "width": body(width=65),
        "steps": body(steps="5"),
        "user_id": body(user_id="mallory"),
        "colour": body(colour="red"),
        "ttl_s": body(ttl_s=10, expires_at="2099-01-01T00:00:00Z"),
        "expires_at": body(expires_at="tomorrow"),
    }
    for field, bad in cases.items():
        answer = http.post("/v1/images/generations", json=bad)
        problem = assert_problem(answer, 422, "invalid-request")
        assert [field] in [error["loc"][1:] for error in problem["errors"]], problem
    assert_problem(http.post("/v1/images/generations", content=b"{"), 422, "invalid-request")
    assert_problem(http.post("/v1/images/generations", json=[1]), 422, "invalid-request")
    bad_key = {"Idempotency-Key": "a\tb"}
    problem = assert_problem(
        http.post("/v1/images/generations", json=body(width=65), headers=bad_key),
        422,
        "invalid-request",
    )
    locs = [error["loc"] for error in problem["errors"]]
    assert ["header", "Idempotency-Key"] in locs and ["body", "width"] in locs, problem

    marker = http.post("/v1/images/generations", json=body(prompt="the marker"))
    assert marker.status_code == 202
    marker_id = marker.json()["id"]
    owner = None

    def reached(messages: list) -> bool:
        nonlocal owner
        for message in messages:
            request = decode(GenerationRequest, message.value())
            if request.request_id == marker_id:
                owner = request.user_id
                return True
        return False

    published = read_topic(settings, REQUESTS, reached, WAIT_S)
    mine = [m for m in published if decode(GenerationRequest, m.value()).user_id == owner]
    assert len(mine) == 1, "only the valid submission was published"


def test_a_body_over_the_limit_is_413(http: httpx.Client) -> None:
    huge = json.dumps(body(prompt="x" * 70_000)).encode()
    problem = assert_problem(
        http.post("/v1/images/generations", content=huge), 413, "body-too-large"
    )
    assert problem["limit_bytes"] == 65_536

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes read count
        yield huge[:40_000]
        yield huge[40_000:]

    assert_problem(http.post("/v1/images/generations", content=chunks()), 413, "body-too-large")


def test_another_users_job_and_a_missing_one_are_404(
    http: httpx.Client, gateway: str, settings: Settings
) -> None:
    job_id = http.post("/v1/images/generations", json=body()).json()["id"]
    with client(gateway, api_key(settings, user())) as other:
        assert _eventually(lambda: other.get("/v1/images/jobs").status_code == 200)
        for path in ("", "/image", "/events"):
            assert_problem(other.get(f"/v1/images/jobs/{job_id}{path}"), 404, "not-found")
        assert_problem(other.post(f"/v1/images/jobs/{job_id}/cancel"), 404, "not-found")
        assert other.get("/v1/images/jobs").json() == {"data": [], "next_cursor": None}
    assert_problem(http.get(f"/v1/images/jobs/{uuid.uuid4()}"), 404, "not-found")
    assert_problem(http.get("/v1/images/jobs/not-an-id"), 404, "not-found")
    assert_problem(http.get("/v1/no-such-route"), 404, "not-found")
    assert_problem(http.delete("/v1/images/jobs"), 405, "method-not-allowed")


def test_an_idempotent_resubmission_is_the_same_job_rendered_once(
    http: httpx.Client, settings: Settings
) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = http.post("/v1/images/generations", json=body(seed=3), headers=key)
    assert first.status_code == 202, first.text
    again = http.post("/v1/images/generations", json=body(seed=3), headers=key)
    assert again.status_code in (200, 202), again.text
    assert again.headers["idempotent-replayed"] == "true"
    job_id = first.json()["id"]
    assert again.json()["id"] == job_id
    mismatch = http.post("/v1/images/generations", json=body(seed=4), headers=key)
    assert assert_problem(mismatch, 422, "idempotency-key-mismatch")["job_id"] == job_id
    # The same request, with defaults spelled out: the same body, as validated.
    spelled = http.post(
        "/v1/images/generations", json=body(seed=3, model="tiny", guidance_scale=7.5), headers=key
    )
    assert spelled.status_code in (200, 202), spelled.text
    assert spelled.json()["id"] == job_id

    assert _wait_until_ended(http, job_id)["status"] == "succeeded"
    results = read_topic(
        settings,
        RESULTS,
        lambda ms: any(decode(GenerationResult, m.value()).request_id == job_id for m in ms),
        WAIT_S,
    )
    rendered = [m for m in results if decode(GenerationResult, m.value()).request_id == job_id]
    assert len(rendered) == 1
    after = http.post("/v1/images/generations", json=body(seed=3), headers=key)
    assert after.status_code == 200 and after.json()["status"] == "succeeded"


def test_a_burst_past_the_rate_limit_is_429_with_retry_after(http: httpx.Client) -> None:
    answers = [http.post("/v1/images/generations", json=body()) for _ in range(5)]
    assert [a.status_code for a in answers[:3]] == [202, 202, 202], [a.text for a in answers]
    problem = assert_problem(answers[3], 429, "rate-limited")
    assert int(answers[3].headers["retry-after"]) >= 1
    assert problem["retry_after_ms"] > 0
    assert problem["job"]["status"] == "rejected" and problem["job_id"]
    # A request dearer than the whole bucket can never pass: 422, not 429.
    dear = http.post("/v1/images/generations", json=body(width=1024, height=1024, steps=25))
    assert_problem(dear, 422, "exceeds-burst")


def test_a_replay_after_retry_after_is_the_retry_the_429_asked_for(
    gateway: str, settings: Settings
) -> None:
    with client(gateway, api_key(settings, REFILLING)) as http:
        assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
        assert http.post("/v1/images/generations", json=body()).status_code == 202
        key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
        refused = http.post("/v1/images/generations", json=body(), headers=key)
        assert_problem(refused, 429, "rate-limited")
        # What this tests is the passing of time: the bucket refills while the client waits.
        time.sleep(int(refused.headers["retry-after"]) + 0.5)
        retried = http.post("/v1/images/generations", json=body(), headers=key)
        assert retried.status_code == 202, retried.text
        assert retried.headers["idempotent-replayed"] == "true"
        assert retried.json()["id"] == refused.json()["job_id"]
        # The job read "rejected" once (the 429), and a gateway that has not yet read past
        # that refusal on imagegen.events still shows it: the job ends succeeded.
        job_url = f"/v1/images/jobs/{retried.json()['id']}"
        assert _eventually(lambda: http.get(job_url).json()["status"] == "succeeded", WAIT_S)


def test_a_cancel_mid_render_ends_the_job_and_a_second_cancel_is_409(
    http: httpx.Client,
) -> None:
    job_id = http.post("/v1/images/generations", json=body(**SLOW)).json()["id"]
    seen: list[tuple[str, int]] = []
    for name, event_id, data in _events(http, job_id):
        seen.append((name, event_id))
        if name == "progress":
            assert data["steps"] == 100 and event_id == 2 + data["step"]
            canceled = http.post(f"/v1/images/jobs/{job_id}/cancel")
            assert canceled.status_code == 202, canceled.text
            break
    ids = [event_id for _, event_id in seen]
    assert ids == sorted(set(ids)) and ("status", 2) in seen, seen
    # Re-attached with the last id seen: only what came after it, up to the end.
    rest = list(_events(http, job_id, last_event_id=ids[-1]))
    assert rest and all(event_id > ids[-1] for _, event_id, _ in rest), rest
    name, event_id, ended = rest[-1]
    assert (name, event_id) == ("completed", 1000)
    assert ended["status"] == "canceled", ended
    assert ended["error"]["reason"] == "canceled"
    second = assert_problem(http.post(f"/v1/images/jobs/{job_id}/cancel"), 409, "job-ended")
    assert second["job"]["status"] == "canceled"
    assert_problem(http.get(f"/v1/images/jobs/{job_id}/image"), 409, "image-not-ready")


def test_the_event_stream_replays_what_the_job_implies_after_last_event_id(
    http: httpx.Client,
) -> None:
    job_id = http.post("/v1/images/generations", json=body()).json()["id"]
    ended = _wait_until_ended(http, job_id)
    # A stream of an ended job is its completion alone, and after it, nothing.
    assert [(n, i) for n, i, _ in _events(http, job_id)] == [("completed", 1000)]
    assert list(_events(http, job_id, last_event_id=1000)) == []
    assert [i for _, i, _ in _events(http, job_id, last_event_id=2)] == [1000]
    assert ended["status"] == "succeeded"


def test_the_jobs_url_streams_its_events_when_asked_for_text_event_stream(
    http: httpx.Client,
) -> None:
    job_id = http.post("/v1/images/generations", json=body()).json()["id"]
    streamed = list(_events(http, job_id, path=""))
    name, event_id, ended = streamed[-1]
    assert (name, event_id, ended["status"]) == ("completed", 1000, "succeeded"), streamed
    assert [i for _, i, _ in streamed] == sorted({i for _, i, _ in streamed})
    assert list(_events(http, job_id, last_event_id=1000, path="")) == []
    # Without asking, the same URL is the Job.
    plain = http.get(f"/v1/images/jobs/{job_id}", headers={"Accept": "*/*"})
    assert plain.headers["content-type"] == "application/json"
    assert plain.json()["status"] == "succeeded"


def _stored_job(settings: Settings, user_id: str, result: bool) -> str:
    """A job in the job store, with a succeeded result when `result`, as the indexer leaves
    one whose result came before this gateway started."""
    jobs = JobStore(ObjectStore(settings))
    request = GenerationRequest.new(user_id=user_id, prompt="a stored fox", **SMALL)
    jobs.put_job(JobRecord(request=request, created_at=request.submitted_at, body_sha256="0" * 64))
    if result:
        jobs.put_result(
            GenerationResult(
                request_id=request.request_id,
                user_id=user_id,
                status=Status.SUCCEEDED,
                bucket=settings.s3_bucket,
                object_key=f"v1/{user_id}/{request.request_id}.png",
                content_type="image/png",
                size_bytes=10,
                sha256="ab" * 32,
                completed_at=utc_now(),
            )
        )
    return request.request_id


def test_a_job_whose_result_came_before_the_gateway_stays_ended_after_its_finished_event(
    gateway: str, settings: Settings
) -> None:
    owner = user()
    ended, marker = _stored_job(settings, owner, True), _stored_job(settings, owner, False)
    with client(gateway, api_key(settings, owner)) as http:
        assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
        assert http.get(f"/v1/images/jobs/{ended}").json()["status"] == "succeeded"
        stream = _events(http, marker)
        assert next(stream)[:2] == ("status", 1)  # queued: the stream follows the hub now
        # One partition holds both, so the hub reads `finished` before the marker's
        # progress (not a `started`, which the processor's fleet watch would count).
        finished = JobEvent(request_id=ended, user_id=owner, type=EventType.FINISHED, at=utc_now())
        progress = JobEvent(
            request_id=marker, user_id=owner, type=EventType.PROGRESS, at=utc_now(), step=1, steps=2
        )
        producer = make_producer(settings)
        for event in (finished, progress):
            producer.produce(EVENTS, key=event.kafka_key, value=encode(event), partition=0)
        assert producer.flush(10) == 0
        assert next(stream)[:2] == ("status", 2)  # the hub read the marker's progress
        stream.close()
        assert http.get(f"/v1/images/jobs/{ended}").json()["status"] == "succeeded"


def test_a_store_outage_is_503_unavailable_with_retry_after_then_recovers(
    settings: Settings, tmp_path
) -> None:
    host, port = settings.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    through_proxy = settings.model_copy(update={"s3_endpoint": proxy.address})
    owner = user()
    job_id = _stored_job(settings, owner, False)  # nothing published: no pipeline needed
    try:
        with (
            GatewayProcess(through_proxy, tmp_path / "gateway.log") as gateway,
            client(gateway.url, api_key(settings, owner)) as http,
        ):
            assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
            proxy.cut()
            for path in ("/v1/images/jobs", f"/v1/images/jobs/{job_id}"):
                answer = http.get(path)
                problem = assert_problem(answer, 503, "unavailable")
                assert int(answer.headers["retry-after"]) >= 1 and problem["retry_after_ms"] > 0
            proxy.restore()
            # Nothing outside the gateway says when its store connections are back.
            assert _eventually(lambda: http.get(f"/v1/images/jobs/{job_id}").status_code == 200)
            assert http.get("/v1/images/jobs").json()["data"][0]["id"] == job_id
    finally:
        proxy.close()


def test_jobs_list_newest_first_page_by_page(http: httpx.Client) -> None:
    ids = [http.post("/v1/images/generations", json=body()).json()["id"] for _ in range(3)]
    first = http.get("/v1/images/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["data"]] == ids[::-1][:2]
    assert first["next_cursor"]
    second = http.get("/v1/images/jobs", params={"limit": 2, "cursor": first["next_cursor"]})
    assert [job["id"] for job in second.json()["data"]] == ids[:1]
    assert second.json()["next_cursor"] is None
    assert_problem(http.get("/v1/images/jobs", params={"cursor": "bogus"}), 422, "invalid-request")
    assert_problem(http.get("/v1/images/jobs", params={"limit": 0}), 422, "invalid-request")


def test_health_readiness_metrics_and_the_api_description(gateway: str) -> None:
    with httpx.Client(base_url=gateway) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        metrics = http.get("/metrics").text
        assert "imagegen_gateway_requests_total" in metrics
        paths = http.get("/openapi.json").json()["paths"]
    assert set(paths) >= {
        "/v1/images/generations",
        "/v1/images/jobs",
        "/v1/images/jobs/{job_id}",
        "/v1/images/jobs/{job_id}/image",
        "/v1/images/jobs/{job_id}/events",
        "/v1/images/jobs/{job_id}/cancel",
    }
    assert "429" in paths["/v1/images/generations"]["post"]["responses"]


def test_the_request_log_holds_no_key(gateway_process: GatewayProcess, settings: Settings) -> None:
    token = api_key(settings, user())
    with client(gateway_process.url, token) as http:
        assert _eventually(lambda: http.get("/v1/images/jobs?cursor=secret-q").status_code == 422)
    log = gateway_process.log.read_text()
    assert "/v1/images/jobs" in log
    assert token not in log and "secret-q" not in log
