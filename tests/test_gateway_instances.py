"""Several gateway instances share nothing but the broker and the bucket: any one answers
for every job, one dying (SIGKILL) loses none, and a new one finds every job in the job
store."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from imagegen.gateway.job_store import JobStore
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from tests.conftest import settings_env
from tests.gateway_process import GatewayProcess, api_key
from tests.processes import Service
from tests.test_gateway import SMALL, WAIT_S

SETTLE_S = 120.0


@pytest.fixture
def pipeline(settings: Settings, tmp_path) -> Iterator[None]:
    env = settings_env(settings)
    processor = Service(["processor"], env, tmp_path / "processor.log")
    worker = Service(["worker", "--device", "cpu"], env, tmp_path / "worker.log")
    processor.start()
    worker.start()
    yield
    worker.stop()
    processor.stop()


def _job(http: httpx.Client, job_id: str) -> dict:
    answer = http.get(f"/v1/images/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _all_succeed(url: str, token: str, ids: list[str]) -> None:
    """Every job reads succeeded on the gateway at `url`, within SETTLE_S: jobs end as the
    worker renders them, and a restarted gateway reads them from the store once indexed;
    neither is announced to an outside reader."""
    deadline = time.monotonic() + SETTLE_S
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=WAIT_S
    ) as http:
        while True:
            statuses = {job_id: _job(http, job_id)["status"] for job_id in ids}
            if set(statuses.values()) == {"succeeded"}:
                return
            assert time.monotonic() < deadline, statuses
            time.sleep(0.5)


def _submit(url: str, headers: dict[str, str], prompt: str) -> str:
    deadline = time.monotonic() + 30
    while True:  # a new key reaches each gateway's book within about a fetch wait
        answer = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": prompt, **SMALL},
            headers=headers,
            timeout=WAIT_S,
        )
        if answer.status_code != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def _all_indexed(settings: Settings, ids: list[str]) -> None:
    """Every job's result is in the job store within SETTLE_S: the indexers write them as
    they read imagegen.results, which tells nobody outside."""
    jobs = JobStore(ObjectStore(settings))
    deadline = time.monotonic() + SETTLE_S
    while True:
        missing = [job_id for job_id in ids if jobs.result(job_id) is None]
        if not missing:
            return
        assert time.monotonic() < deadline, f"not indexed: {missing}"
        time.sleep(0.5)


def test_a_killed_instance_loses_no_job_and_a_new_one_reads_every_job(
    pipeline: None, settings: Settings, tmp_path
) -> None:
    del pipeline
    first = GatewayProcess(settings, tmp_path / "first.log").start()
    second = GatewayProcess(settings, tmp_path / "second.log").start()
    try:
        token = api_key(settings, f"u-{uuid.uuid4().hex[:12]}")
        headers = {"Authorization": f"Bearer {token}"}
        ids = [
            _submit((first if index % 2 else second).url, headers, f"a kite, number {index}")
            for index in range(6)
        ]

        # One instance dies with its jobs in flight: SIGKILL, no shutdown code runs, and it
        # never leaves the group imagegen-job-index.
        first.kill()
        # The other answers for every job, old and new, and streams the events of one the
        # dead one took.
        ids.append(_submit(second.url, headers, "a kite after the crash"))
        events = f"{second.url}/v1/images/jobs/{ids[1]}/events"
        with httpx.stream("GET", events, headers=headers, timeout=WAIT_S) as stream:
            lines = list(stream.iter_lines())
        assert "event: completed" in lines and "id: 1000" in lines, lines
        _all_succeed(second.url, token, ids)
        # Its indexer took over the dead one's partitions once the session timed out: with
        # no other gateway running, every result reached the job store through it.
        _all_indexed(settings, ids)

        # A new instance after the crash joins the group (it would not be ready otherwise)
        # and, knowing nothing but the store, reads every job as it was.
        first.restart()
        _all_succeed(first.url, token, ids)
        with httpx.Client(base_url=first.url, headers=headers, timeout=WAIT_S) as http:
            listed = http.get("/v1/images/jobs", params={"limit": 100}).json()["data"]
        assert {job["id"] for job in listed} == set(ids)

        # A clean stop leaves the group: the one left indexes what comes next.
        # SIGTERM: a full shutdown, then uvicorn ends the process by the same signal.
        assert second.stop() == -signal.SIGTERM, second.tail()
        assert "Application shutdown complete" in second.tail()
        ids.append(_submit(first.url, headers, "a kite after the stop"))
        _all_succeed(first.url, token, ids)
        _all_indexed(settings, ids)
    finally:
        for gateway in (first, second):
            if gateway.process is not None and gateway.process.poll() is None:
                gateway.stop()
