"""`/healthz` and `/readyz` on the metrics port: the rules (`imagegen.infra.health`), and the
worker, the processor and the webhook deliverer answering them as real processes."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from imagegen.infra.health import PROBE_EVERY_S, Health, Liveness, Readiness
from imagegen.infra.metrics import serve
from imagegen.infra.settings import Settings
from tests.conftest import settings_env
from tests.helpers import free_port
from tests.processes import Service
from tests.proxy import Proxy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_that_stops_turning_is_named_once_past_its_limit() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    assert liveness.stalled() == []  # nothing registered yet: a model load is alive
    liveness.beat("poll loop")
    liveness.beat("slow loop", stall_s=300)
    clock.now += 60
    assert liveness.stalled() == []
    clock.now += 1
    assert liveness.stalled() == ["the poll loop has not turned for 61s"]
    liveness.beat("poll loop")
    assert liveness.stalled() == []


def test_readiness_names_every_condition_that_does_not_hold() -> None:
    clock = Clock()
    readiness = Readiness(clock)
    calls: list[float] = []
    broker_up = False

    def broker() -> None:
        calls.append(clock.now)
        if not broker_up:
            raise ConnectionError("no broker at 127.0.0.1:9")

    readiness.wait_for("model", "loading tiny")
    readiness.probe("broker", broker)
    assert readiness.unready() == ["model: loading tiny", "broker: no broker at 127.0.0.1:9"]
    readiness.holds("model")
    broker_up = True
    # The probe's answer is kept for a while: frequent probes do not load the broker.
    assert readiness.unready() == ["broker: no broker at 127.0.0.1:9"]
    clock.now += PROBE_EVERY_S
    assert readiness.unready() == []
    assert calls == [1000.0, 1000.0 + PROBE_EVERY_S]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_metrics_port_serves_health_beside_the_metrics() -> None:
    health = Health()
    health.readiness.wait_for("group", "not yet assigned partitions")
    port = free_port()
    server = serve(port, "127.0.0.1", setting="THE_SETTING", health=health)
    assert server is not None
    try:
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "group: not yet assigned partitions\n")
        health.readiness.holds("group")
        assert get(f"{base}/readyz") == (200, "ok\n")
        status, metrics = get(f"{base}/metrics")
        assert status == 200 and "imagegen_records_consumed_total" in metrics
    finally:
        server.shutdown()


def answers(url: str, wanted: int, timeout_s: float = 120) -> str:
    """The body of `url` once it answers `wanted`."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = get(url)
        except (urllib.error.URLError, ConnectionError) as error:
            last = error  # the process is not listening yet
        else:
            if status == wanted:
                return body
            last = (status, body)
        time.sleep(0.2)  # a probe, as Kubernetes makes it: nothing to wait on but the answer
    pytest.fail(f"{url} never answered {wanted}; last: {last}")


def start(command: list[str], stack: Settings, log: Path, **env: str) -> Service:
    variables = {"IMAGEGEN_METRICS_HOST": "127.0.0.1", **env}
    service = Service(command, {**settings_env(stack), **variables}, log)
    service.start()
    return service


def test_a_worker_is_ready_once_loaded_and_assigned_and_not_while_the_store_is_cut(
    isolated_stack: Settings, tmp_path: Path
) -> None:
    host, store_port = isolated_stack.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(store_port))
    through_proxy = isolated_stack.model_copy(update={"s3_endpoint": proxy.address})
    port = free_port()
    worker = start(
        ["worker", "--device", "cpu", "--metrics-port", str(port)],
        through_proxy,
        tmp_path / "worker.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert answers(f"{base}/readyz", 200) == "ok\n"
        assert get(f"{base}/healthz") == (200, "ok\n")
        proxy.cut()
        assert "store: " in answers(f"{base}/readyz", 503)
        # An outage is no reason to restart the worker: it stays alive, and says so.
        assert get(f"{base}/healthz") == (200, "ok\n")
        proxy.restore()
        answers(f"{base}/readyz", 200)
        worker.assert_running()
    finally:
        worker.stop()
        proxy.close()


@pytest.mark.parametrize(
    ("command", "port_variable"),
    [
        (["processor"], "IMAGEGEN_PROCESSOR_METRICS_PORT"),
        (["webhooks"], "IMAGEGEN_WEBHOOKS_METRICS_PORT"),
    ],
)
def test_the_processor_and_the_deliverer_get_ready_and_stay_alive(
    command: list[str], port_variable: str, isolated_stack: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = {port_variable: str(port)}
    service = start(command, isolated_stack, tmp_path / "service.log", **env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert answers(f"{base}/readyz", 200) == "ok\n"
        assert get(f"{base}/healthz") == (200, "ok\n")
        service.assert_running()
    finally:
        assert service.stop() == 0
