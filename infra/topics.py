"""The pipeline's topics, their partition counts and configs, in one place.

`ensure_topics` creates what is missing and leaves existing topics alone, so every process may
call it at start-up. On a managed cluster where clients may not create topics, create these
by hand with the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from imagegen.infra.settings import Settings
from imagegen.schemas.errors import BrokerUnavailable
from imagegen.schemas.topics import DLQ, RENDER, REQUESTS, RESULTS

DAY_MS = 24 * 60 * 60 * 1000


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
    TopicSpec(RESULTS, 6, {"retention.ms": str(7 * DAY_MS)}),
    # Operators inspect and replay the DLQ, sometimes weeks later.
    TopicSpec(DLQ, 3, {"retention.ms": str(30 * DAY_MS)}),
)


def ensure_topics(admin: AdminClient, settings: Settings, timeout_s: float = 15.0) -> list[str]:
    """Create the missing topics; return the names created."""
    new = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=settings.topic_replication_factor,
            config=spec.config,
        )
        for spec in TOPICS
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
