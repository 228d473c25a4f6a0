"""The pipeline's topics, their partition counts and configs, in one place.

`ensure_topics` creates what is missing and leaves existing topics alone, so every process may
call it at start-up. On a managed cluster where clients may not create topics, create these
by hand with the same names and configs.

Created topics carry `min.insync.replicas` = min(2, their replication factor): with the
producers' `acks=all`, a write then survives the loss of any one broker, and a topic with a
single replica still accepts writes. When the replication factor is the cluster's default
(`IMAGEGEN_TOPIC_REPLICATION_FACTOR=-1`), it is read from the broker's
`default.replication.factor`; a broker that does not say (Tansu, or one whose ACLs refuse
DescribeConfigs) keeps its own `min.insync.replicas`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from imagegen.infra.settings import Settings
from imagegen.schemas.errors import BrokerUnavailable
from imagegen.schemas.topics import (
    API_KEYS,
    CANCELLATIONS,
    DLQ,
    EVENTS,
    RENDER,
    RENDER_BATCH,
    REQUESTS,
    RESULTS,
    WEBHOOK_RETRIES,
    WEBHOOK_SECRETS,
)

DAY_MS = 24 * 60 * 60 * 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


# Partitions bound the parallelism of each stage: processors scale up to `requests`
# partitions, render workers up to `render` partitions.
TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(REQUESTS, 6, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(RENDER, 6, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(RENDER_BATCH, 6, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(RESULTS, 6, {"retention.ms": str(7 * DAY_MS)}),
    # Events are for watching jobs as they run; a day is long past any job's end.
    TopicSpec(EVENTS, 6, {"retention.ms": str(DAY_MS)}),
    # One cancellation per request survives compaction; every reader loads them all at
    # start-up, so old ones are deleted too, once no request they name can still run.
    TopicSpec(
        CANCELLATIONS,
        3,
        {"cleanup.policy": "compact,delete", "retention.ms": str(7 * DAY_MS)},
    ),
    # Every gateway loads all API keys at start-up; a key lives until revoked, and its
    # revocation is its latest record, so nothing may be deleted but what compaction drops.
    TopicSpec(API_KEYS, 1, {"cleanup.policy": "compact", "retention.ms": "-1"}),
    # Every deliverer loads all secrets at start-up; a user's latest secret is the one.
    TopicSpec(WEBHOOK_SECRETS, 1, {"cleanup.policy": "compact", "retention.ms": "-1"}),
    # A delivery is retried for a day (IMAGEGEN_WEBHOOK_RETRY_S) at most, so two days of
    # retention hold every delivery still waiting, even one behind a stopped deliverer.
    *(TopicSpec(topic, 6, {"retention.ms": str(2 * DAY_MS)}) for topic in WEBHOOK_RETRIES),
    # Operators inspect and replay the DLQ, sometimes weeks later.
    TopicSpec(DLQ, 3, {"retention.ms": str(30 * DAY_MS)}),
)


def ensure_topics(
    admin: AdminClient,
    settings: Settings,
    timeout_s: float = 15.0,
    topics: Sequence[TopicSpec] = TOPICS,
) -> list[str]:
    """Create the missing `topics`; return the names created."""
    durability = _durability(admin, settings.topic_replication_factor, timeout_s)
    new = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=settings.topic_replication_factor,
            config={**durability, **spec.config},
        )
        for spec in topics
    ]
    created = []
    futures = admin.create_topics(new, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise BrokerUnavailable(
                f"could not create topic {name} at {settings.kafka_bootstrap}: {error.str()}"
            ) from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"creating topic {name} at {settings.kafka_bootstrap} timed out after "
                f"{timeout_s:.0f}s; is the broker up? (`imagegen stack status`)"
            ) from exc
        created.append(name)
    return created


def _durability(admin: AdminClient, replication_factor: int, timeout_s: float) -> dict[str, str]:
    """The `min.insync.replicas` config for topics created with `replication_factor`."""
    if replication_factor == -1:
        default = _default_replication_factor(admin, timeout_s)
        if default is None:
            log.info(
                "the broker does not say its default.replication.factor: new topics keep the "
                "broker's min.insync.replicas (set IMAGEGEN_TOPIC_REPLICATION_FACTOR to choose)"
            )
            return {}
        replication_factor = default
    return {"min.insync.replicas": str(min(2, replication_factor))}


def _default_replication_factor(admin: AdminClient, timeout_s: float) -> int | None:
    """The replication factor the cluster gives a topic created with -1, if a broker says."""
    try:
        brokers = admin.list_topics(timeout=timeout_s).brokers
        if not brokers:
            return None
        resource = ConfigResource(ResourceType.BROKER, str(min(brokers)))
        futures = admin.describe_configs([resource], request_timeout=timeout_s)
        entry = futures[resource].result(timeout=timeout_s).get("default.replication.factor")
    except (KafkaException, TimeoutError):
        # Creating the topics next reports an unreachable broker, with advice.
        return None
    if entry is None or entry.value is None:
        return None
    return int(entry.value)
