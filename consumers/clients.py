"""The clients a render worker talks to the broker and the object store through.

`make_worker_clients` builds the ones a worker process uses; the worker takes them ready
made, so that whoever starts it (a test, a benchmark) may hand it others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from imagegen.infra.kafka import check_broker, make_admin, make_consumer, make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.schemas.topics import RENDER, RENDER_BATCH, WORKER_GROUPS


@dataclass(frozen=True)
class WorkerClients:
    # One consumer per topic, imagegen.render and imagegen.render.batch, each a member of
    # the topic's worker group (`schemas.topics.WORKER_GROUPS` says why), not yet
    # subscribed.
    consumers: Mapping[str, Consumer]
    producer: Producer
    admin: AdminClient
    store: ObjectStore


def make_worker_clients(settings: Settings) -> WorkerClients:
    """The worker's clients for `settings`; `BrokerUnavailable` unless the broker answers."""
    check_broker(settings)
    return WorkerClients(
        admin=make_admin(settings),
        store=ObjectStore(settings),
        producer=make_producer(settings),
        consumers={
            topic: _consumer(settings, WORKER_GROUPS[topic]) for topic in (RENDER, RENDER_BATCH)
        },
    )


def _consumer(settings: Settings, group: str) -> Consumer:
    return make_consumer(
        settings,
        group,
        # The poll loop never blocks on work, so a short interval costs nothing, and
        # some brokers (Tansu) hold a group's first join for half of it.
        **{
            "max.poll.interval.ms": max(settings.kafka_session_timeout_ms, 1000),
            # The processor sheds load by the backlog behind the committed offsets
            # (`imagegen.processors.load`); librdkafka's default 5 s between commits
            # would make the backlog read a few seconds' work too high.
            "auto.commit.interval.ms": 500,
            # A worker joining or leaving moves only the partitions that must move;
            # the eager default would stop every worker's fetching for each rebalance
            # (what KEDA scaling does often). `RenderWorker._on_assign` adds partitions
            # incrementally to match.
            "partition.assignment.strategy": "cooperative-sticky",
        },
    )
