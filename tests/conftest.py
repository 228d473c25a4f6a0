"""The test stack: a real Kafka-protocol broker and a real S3 server, never mocks.

Where they come from, in order:
- `IMAGEGEN_TEST_STACK=docker`: Apache Kafka and MinIO containers from testcontainers;
- `IMAGEGEN_KAFKA_BOOTSTRAP` / `IMAGEGEN_S3_ENDPOINT` set: whatever they point at;
- otherwise: the embedded stack (Tansu and moto) on free ports, stopped after the session.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from imagegen.infra.embedded import EMBEDDED_FETCH_WAIT_MS, EmbeddedStack
from imagegen.infra.provision import provision
from imagegen.infra.settings import Settings, as_environment, load_settings
from tests.helpers import free_port
from tests.processes import log_tails

# Tansu holds a group's first join for half the session timeout: keep it short in tests.
TEST_SESSION_TIMEOUT_MS = 2000
TEST_SETTINGS = {
    # Tests start many processors and workers at once, here and beside other people's runs:
    # none serves metrics (on a fixed port) unless its test asks for it.
    "processor_metrics_port": 0,
    "worker_metrics_port": 0,
    "webhooks_metrics_port": 0,
    # Operators and processors of a test stack share a replay key, as a deployment's do.
    "replay_key": "test-replay",
    # Test receivers listen on 127.0.0.1, over plain http.
    "webhook_allow_private": True,
}


STACK_FIXTURES = frozenset({"settings", "isolated_stack"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the stack, directly or through another fixture, as
    `integration`, so that `pytest -m "not integration"` runs the rest in a minute."""
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with the logs of the services that ran during it."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        report.sections.extend(log_tails(since=call.start))
    return report


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Leave the root logger, and warnings capture, as they were before the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that points a child process (the CLI, a worker) at `settings`' stack."""
    return {**os.environ, **as_environment(settings)}


def _docker_stack() -> Iterator[Settings]:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.minio import MinioContainer

    minio_image = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
    with (
        KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka,
        MinioContainer(image=minio_image) as minio,
    ):
        config = minio.get_config()
        settings = load_settings(
            kafka_bootstrap=kafka.get_bootstrap_server(),
            s3_endpoint=config["endpoint"],
            s3_access_key=config["access_key"],
            s3_secret_key=config["secret_key"],
            kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
            **TEST_SETTINGS,
        )
        provision(settings, progress=lambda _: None)
        yield settings


def _embedded_stack(state_dir: Path) -> Iterator[Settings]:
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        s3_endpoint=f"127.0.0.1:{free_port()}",
        state_dir=str(state_dir),
        kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        kafka_fetch_wait_ms=EMBEDDED_FETCH_WAIT_MS,
        **TEST_SETTINGS,
    )
    stack = EmbeddedStack(settings)
    stack.up(progress=lambda _: None)
    try:
        yield settings
    finally:
        stack.down()


@pytest.fixture
def isolated_stack(tmp_path: Path) -> Iterator[Settings]:
    """A stack of its own, for tests whose processes keep state across the whole topic."""
    if (
        os.environ.get("IMAGEGEN_TEST_STACK") == "docker"
        or "IMAGEGEN_KAFKA_BOOTSTRAP" in os.environ
    ):
        pytest.skip("needs the embedded stack to start a private broker")
    yield from _embedded_stack(tmp_path / "stack")


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a running, provisioned broker and object store."""
    if os.environ.get("IMAGEGEN_TEST_STACK") == "docker":
        yield from _docker_stack()
    elif "IMAGEGEN_KAFKA_BOOTSTRAP" in os.environ or "IMAGEGEN_S3_ENDPOINT" in os.environ:
        configured = load_settings(
            kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS, **TEST_SETTINGS
        )
        provision(configured, progress=lambda _: None)
        yield configured
    else:
        yield from _embedded_stack(tmp_path_factory.mktemp("stack"))
