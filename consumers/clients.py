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
from imagegen.schemas.topics import RENDER, RENDER_BATCH, WORKER_GROUP


@dataclass(frozen=True)
class WorkerClients:
    # One consumer per topic, imagegen.render and imagegen.render.batch, each a member of
    # the worker group, not yet subscribed. Assignment is cooperative-sticky, which
    # balances a group's partitions in all and not topic by topic: one member subscribed
    # to both topics could end up with every interactive partition while another holds
    # only batch ones (measured: a second worker joining took all six of imagegen.render).
    # A member per topic has each topic shared out evenly among the workers.
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
        consumers={topic: _consumer(settings) for topic in (RENDER, RENDER_BATCH)},
    )


def _consumer(settings: Settings) -> Consumer:
    return make_consumer(
        settings,
        WORKER_GROUP,
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
