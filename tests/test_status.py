"""`imagegen status` as a user runs it, and the monitoring files that compose provisions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from confluent_kafka import TopicPartition
from prometheus_client import start_http_server

from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.settings import Settings
from imagegen.schemas.topics import CANCELLATIONS, DLQ, EVENTS, RENDER, RENDER_BATCH, REQUESTS
from tests.conftest import settings_env
from tests.helpers import free_port

INFRA = Path(__file__).resolve().parent.parent / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "imagegen.json"


def imagegen_status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegen", "status", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def produce_batches(settings: Settings, topic: str, counts: dict[int, int]) -> None:
    """`counts[p]` records to partition p, in one batch: Tansu reports a high watermark
    inside such a batch, so exact counts show that `status` reads the ends a fetch reports."""
    producer = make_producer(settings, **{"linger.ms": 100})
    for partition, count in counts.items():
        for n in range(count):
            producer.produce(topic, value=f"{partition}-{n}".encode(), partition=partition)
    assert producer.flush(10) == 0


def commit_as(settings: Settings, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Join `group` on `topic` and commit `offsets` (partition: next offset to read)."""
    consumer = make_consumer(settings, group, **{"enable.auto.commit": False})
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            assert time.monotonic() < deadline, f"{group} got no partitions of {topic}"
            consumer.poll(0.5)
        committed = consumer.commit(
            offsets=[TopicPartition(topic, p, offset) for p, offset in offsets.items()],
            asynchronous=False,
        )
        assert all(tp.error is None for tp in committed or [])
    finally:
        consumer.close()


def test_status_shows_topics_groups_lag_and_the_dlq(isolated_stack: Settings) -> None:
    produce_batches(isolated_stack, RENDER, {0: 5, 1: 3, 2: 4})
    produce_batches(isolated_stack, RENDER_BATCH, {1: 2, 4: 7})
    produce_batches(isolated_stack, REQUESTS, {0: 2})
    # The workers handled 3 of partition 0 and all of partition 1, and never committed on 2;
    # of the batch queue, they handled 1 record of partition 4 and committed nothing else.
    commit_as(isolated_stack, "imagegen-workers", RENDER, {0: 3, 1: 3})
    commit_as(isolated_stack, "imagegen-workers-batch", RENDER_BATCH, {4: 1})
    commit_as(isolated_stack, "test-status-other", REQUESTS, {0: 1})
    # A real metrics server for the processor's port, and nothing on the worker's.
    metrics_port, nothing_port = free_port(), free_port()
    server, thread = start_http_server(metrics_port, "127.0.0.1")
    env = {
        **settings_env(isolated_stack),
        "IMAGEGEN_PROCESSOR_METRICS_PORT": str(metrics_port),
        "IMAGEGEN_WORKER_METRICS_PORT": str(nothing_port),
    }

    try:
        result = imagegen_status(env, "--json")
        table = imagegen_status(env)
    finally:
        server.shutdown()
        thread.join()

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    checks = {check["name"]: check for check in report["checks"]}
    assert all(checks[name]["healthy"] for name in ("broker", "object store", "bucket"))
    assert checks["processor metrics"]["healthy"]
    # No worker runs: reported, with what to do, but the stack is healthy without one.
    assert not checks["worker metrics"]["healthy"]
    assert "imagegen worker" in checks["worker metrics"]["detail"]
    assert not checks["worker metrics"]["required"]

    topics = {topic["name"]: topic for topic in report["topics"]}
    assert {RENDER, RENDER_BATCH, REQUESTS, EVENTS, CANCELLATIONS, DLQ} <= topics.keys()
    assert topics[RENDER]["records"] == 12
    assert [p["records"] for p in topics[RENDER]["partitions"]] == [5, 3, 4, 0, 0, 0]
    assert topics[REQUESTS]["records"] == 2
    assert report["dlq_records"] == 0

    groups = {group["group"]: group for group in report["groups"]}
    workers, batch_workers = groups["imagegen-workers"], groups["imagegen-workers-batch"]
    lag = {
        (p["topic"], p["partition"]): (p["committed"], p["lag"])
        for group in (workers, batch_workers)
        for p in group["partitions"]
    }
    assert {p: lag[RENDER, p] for p in range(6)} == {
        0: (3, 2),
        1: (3, 0),
        2: (None, 4),
        3: (None, 0),
        4: (None, 0),
        5: (None, 0),
    }
    # The batch queue counts too, also where the workers never committed.
    assert {p: lag[RENDER_BATCH, p] for p in range(6)} == {
        0: (None, 0),
        1: (None, 2),
        2: (None, 0),
        3: (None, 0),
        4: (1, 6),
        5: (None, 0),
    }
    assert len(lag) == 12
    assert (workers["total_lag"], batch_workers["total_lag"]) == (6, 8)
    # A pipeline group that never committed is still shown, owing its topic's backlog.
    assert groups["imagegen-processor"]["total_lag"] == 2
    other = groups["test-status-other"]
    assert [(p["topic"], p["partition"], p["lag"]) for p in other["partitions"]] == [
        (REQUESTS, 0, 1)
    ]

    assert table.returncode == 0, table.stdout + table.stderr
    assert "imagegen-workers" in table.stdout and "test-status-other" in table.stdout
    assert f"{RENDER} 0:2 1:0 2:4 3:0 4:0 5:0" in table.stdout
    assert f"{RENDER_BATCH} 0:0 1:2 2:0 3:0 4:6 5:0" in table.stdout
    assert EVENTS in table.stdout and CANCELLATIONS in table.stdout
    assert f"{DLQ}: empty" in table.stdout


@pytest.mark.parametrize(
    ("broken", "variable", "advice"),
    [
        ("broker", "IMAGEGEN_KAFKA_BOOTSTRAP", "imagegen stack up"),
        ("object store", "IMAGEGEN_S3_ENDPOINT", "imagegen stack up"),
        ("bucket", "IMAGEGEN_S3_BUCKET", "imagegen init"),
    ],
)
def test_an_unhealthy_stack_is_reported_quickly_with_exit_1(
    settings: Settings, broken: str, variable: str, advice: str
) -> None:
    wrong = "no-such-bucket" if broken == "bucket" else f"127.0.0.1:{free_port()}"
    env = {**settings_env(settings), variable: wrong}

    started = time.monotonic()
    result = imagegen_status(env, "--json")
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < 20
    assert "Traceback" not in result.stderr
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert not checks[broken]["healthy"]
    assert advice in checks[broken]["detail"]
    assert all(
        check["healthy"] for name, check in checks.items() if check["required"] and name != broken
    )

    table = imagegen_status(env)

    assert table.returncode == 1
    assert "Traceback" not in table.stderr
    assert advice in table.stdout


# What the processor and workers export (issue 6); the dashboard may use nothing else.
METRICS = {
    "imagegen_records_consumed_total": "counter",
    "imagegen_records_produced_total": "counter",
    "imagegen_intake_requests_total": "counter",
    "imagegen_render_batch_size": "histogram",
    "imagegen_render_seconds": "histogram",
    "imagegen_encode_seconds": "histogram",
    "imagegen_upload_seconds": "histogram",
    "imagegen_in_flight_requests": "gauge",
    "imagegen_retries_total": "counter",
    "imagegen_dlq_records_total": "counter",
    "imagegen_device_seconds_total": "counter",
    "imagegen_jobs_ended_early_total": "counter",
    "imagegen_cancellations_ignored_total": "counter",
    "imagegen_events_unsent_total": "counter",
    "imagegen_webhook_deliveries_total": "counter",
    "imagegen_webhook_seconds": "histogram",
    "imagegen_fleet_start_rate": "gauge",
    "imagegen_consumer_lag": "gauge",
    "imagegen_gpu_memory_allocated_bytes": "gauge",
    "imagegen_gpu_memory_reserved_bytes": "gauge",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
PROMQL_OPERATORS = {"and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions,
    aggregation clauses, label matchers, ranges or string literals."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    identifiers = re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", bare)
    return {name for name in identifiers if name not in PROMQL_KEYWORDS | PROMQL_OPERATORS}


def series_name(name: str) -> str:
    """The metric a selected series belongs to (histograms add _bucket, _sum, _count)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base) == "histogram":
            return base
    return name


def test_the_dashboard_uses_only_the_exported_metrics_and_all_of_them() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    used = {series_name(name) for expr in exprs for name in metric_names(expr)}
    assert used - METRICS.keys() == set(), "the dashboard queries metrics nobody exports"
    assert METRICS.keys() - used == set(), "exported metrics missing from the dashboard"
    # Every panel reads the provisioned data source, by its fixed uid.
    datasources = yaml.safe_load(
        (INFRA / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {source["uid"] for source in datasources}
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} <= uids


def test_prometheus_scrapes_the_host_processes_that_compose_points_it_at() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert "host.docker.internal:host-gateway" in prometheus["extra_hosts"]
    config = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"host.docker.internal:{port}" for port in (9464, 9465, 9466)}
    # Every file compose mounts into Prometheus and Grafana is in the repository.
    for service in ("prometheus", "grafana"):
        for volume in compose["services"][service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (INFRA / source).exists(), f"{service} mounts missing {source}"
