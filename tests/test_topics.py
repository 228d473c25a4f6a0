"""Created topics carry `min.insync.replicas` = min(2, their replication factor)."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from imagegen.infra.kafka import make_admin
from imagegen.infra.settings import Settings
from imagegen.infra.topics import TopicSpec, ensure_topics
from imagegen.schemas.errors import BrokerUnavailable


def topic_config(admin: AdminClient, topic: str) -> dict[str, str | None]:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource], request_timeout=10)[resource].result(timeout=10)
    return {name: entry.value for name, entry in entries.items()}


def create(settings: Settings, replication_factor: int) -> tuple[AdminClient, str]:
    """A fresh topic of one partition, created by `ensure_topics` with `replication_factor`."""
    admin = make_admin(settings)
    spec = TopicSpec(f"test.topics.{uuid.uuid4().hex}", 1, {"retention.ms": "60000"})
    replicated = settings.model_copy(update={"topic_replication_factor": replication_factor})
    try:
        assert ensure_topics(admin, replicated, topics=[spec]) == [spec.name]
    except BrokerUnavailable as exc:
        if "replication factor" in str(exc).lower():
            pytest.skip(f"this cluster cannot hold {replication_factor} replicas: {exc}")
        raise
    return admin, spec.name


@pytest.mark.parametrize(("replication_factor", "in_sync"), [(1, "1"), (3, "2")])
def test_a_created_topic_needs_min_2_replicas_in_sync(
    settings: Settings, replication_factor: int, in_sync: str
) -> None:
    admin, topic = create(settings, replication_factor)
    config = topic_config(admin, topic)
    assert config["min.insync.replicas"] == in_sync
    assert config["retention.ms"] == "60000"  # the spec's own config still applies


def test_with_the_cluster_default_the_broker_default_replication_factor_decides(
    settings: Settings,
) -> None:
    admin = make_admin(settings)
    broker = min(admin.list_topics(timeout=10).brokers)
    resource = ConfigResource(ResourceType.BROKER, str(broker))
    stated = admin.describe_configs([resource], request_timeout=10)[resource].result(timeout=10)
    default = stated.get("default.replication.factor")

    admin, topic = create(settings, -1)
    config = topic_config(admin, topic)
    if default is not None and default.value is not None:
        assert config["min.insync.replicas"] == str(min(2, int(default.value)))
    else:
        # Tansu states no broker configs: the topic keeps the broker's own setting, which
        # Tansu reports only when a topic sets it.
        assert "min.insync.replicas" not in config
