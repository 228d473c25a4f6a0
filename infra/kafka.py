"""Kafka client factories with safe defaults set in code.

- Producers are idempotent with acks=all: a retried send never duplicates or reorders records.
- Producers partition keyed records as the Java client does (murmur2), so that a reader can
  compute which partition holds a key.
- Consumers never store an offset on their own (`enable.auto.offset.store=false`). The owner
  calls `consumer.store_offsets(message)` once the message is fully handled, and the
  background auto-commit only ever commits stored offsets. A crash therefore replays
  unfinished work instead of skipping it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, cast

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from imagegen.infra.settings import Settings, split_host_port
from imagegen.schemas.errors import BrokerUnavailable

# librdkafka logs through Python logging, so its output follows the process's log settings.
_librdkafka_log = logging.getLogger("imagegen.librdkafka")

#: Record headers as `Producer.produce` takes them. Its stub wants a list of exactly this
#: item type, so a `list[tuple[str, bytes]]` does not pass: build the list as this type.
ProduceHeaders = list[tuple[str, str | bytes | None]]
#: The headers of a consumed record, as confluent-kafka hands them over.
ConsumedHeaders = list[tuple[str, bytes | None]]


def _base(settings: Settings, role: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": f"imagegen-{role}-{socket.gethostname()}",
        "logger": _librdkafka_log,
        **settings.kafka_security(),
    }


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    config = {
        **_base(settings, "producer"),
        "enable.idempotence": True,
        "acks": "all",
        # Every record here is one somebody waits for (a request, a result): a millisecond
        # for company, not librdkafka's five. Bulk senders pass a longer linger.
        "linger.ms": 1,
        # Readers compute where a key lands (`imagegen fetch` reads only the results
        # partition of its request id: `infra.partitioning`). That needs one partitioner
        # for every producer: murmur2, the Java client's default and aiokafka's (faust, in
        # the processor), not librdkafka's default CRC32.
        "partitioner": "murmur2_random",
        **overrides,
    }
    return Producer(config)


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    config = {
        **_base(settings, "consumer"),
        "group.id": group_id,
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        # Ten heartbeats per session, whatever the session length (the default, 3 s, would
        # let a short session expire between two heartbeats). A member hears of a rebalance
        # at its next heartbeat, and Tansu closes a join round after about half a session
        # without waiting for members that have not heard yet; a member that then joins
        # alone starts another round, which fails the others' sync (seen: a fourth worker
        # joining three never assigned, on a busy 2-core host).
        "heartbeat.interval.ms": max(100, settings.kafka_session_timeout_ms // 10),
        "fetch.wait.max.ms": settings.kafka_fetch_wait_ms,
        **overrides,
    }
    return Consumer(config)


def make_admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient({**_base(settings, "admin"), **overrides})


def check_broker(settings: Settings, timeout_s: float = 5.0) -> None:
    """Raise `BrokerUnavailable`, saying what to do, unless the cluster answers in time."""
    advice = (
        "Start the embedded one with `imagegen stack up`, or point IMAGEGEN_KAFKA_BOOTSTRAP at "
        "your cluster."
    )
    # A plain connect first: librdkafka would log every refused reconnect while it waits.
    if not any(
        _accepts_connections(address, timeout_s) for address in settings.kafka_bootstrap.split(",")
    ):
        raise BrokerUnavailable(
            f"no Kafka broker accepts connections at {settings.kafka_bootstrap}. {advice}"
        )
    try:
        make_admin(settings).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answered at {settings.kafka_bootstrap} within {timeout_s:g}s "
            f"({exc.args[0].str()}). {advice}"
        ) from exc


def _accepts_connections(address: str, timeout_s: float) -> bool:
    host, port = split_host_port(address.strip(), "IMAGEGEN_KAFKA_BOOTSTRAP")
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 2.0)).close()
    except OSError:
        return False
    return True


def fetched_end_offsets(
    settings: Settings, partitions: list[tuple[str, int]], timeout_s: float = 30.0
) -> dict[tuple[str, int], int]:
    """Each partition's end offset as a fetch reports it: the offset the next record will get.

    ListOffsets is the usual way to ask, but some Kafka-protocol brokers (Tansu 0.6.0, the
    embedded one) answer it with an offset inside the partition's last multi-record batch.
    Fetch responses carry the true end on every broker: reading from that answer to the end
    of the partition finds it.
    """
    if not partitions:
        return {}
    reader = EndOffsets(settings)
    try:
        return reader.read(partitions, timeout_s)
    finally:
        reader.close()


class EndOffsets:
    """Reads end offsets as `fetched_end_offsets` does, through one consumer kept for
    repeated reads: a monitor that asks every few seconds would otherwise open new broker
    connections (and, on a secured cluster, new TLS and SASL handshakes) each time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer = make_consumer(
            settings,
            group_id="imagegen-end-offsets",  # never joined nor committed: assigned partitions
            **{"enable.partition.eof": True, "enable.auto.commit": False, "fetch.wait.max.ms": 10},
        )

    def read(
        self, partitions: list[tuple[str, int]], timeout_s: float = 30.0
    ) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        # Assigning anew discards what the last read left queued and starts from the end.
        self._consumer.assign([TopicPartition(topic, p, OFFSET_END) for topic, p in partitions])
        try:
            return self._read_ends(set(partitions), timeout_s)
        finally:
            # Between reads nothing stays assigned: the consumer would otherwise keep
            # fetching in the background, a request every fetch wait.
            self._consumer.unassign()

    def _read_ends(
        self, partitions: set[tuple[str, int]], timeout_s: float
    ) -> dict[tuple[str, int], int]:
        ends: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(partitions):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(partitions - set(ends))
                raise BrokerUnavailable(
                    f"no end offset for {missing} within {timeout_s:g}s; is the broker at "
                    f"{self._settings.kafka_bootstrap} healthy?"
                )
            message = self._consumer.poll(min(remaining, 1.0))
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                topic, partition, offset = record_position(message)
                ends[(topic, partition)] = offset
            elif error is not None and error.fatal():
                raise KafkaException(error)
        return ends

    def close(self) -> None:
        self._consumer.close()


def record_position(message: Message) -> tuple[str, int, int]:
    """The topic, partition and offset of a consumed record or partition-EOF event.

    librdkafka reports none of them (the stub's None) only for an event of no partition,
    such as a client error: callers handle those first, so one here is a bug.
    """
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"message without a position ({message.error()}): not a consumed record")
    return topic, partition, offset


def consumed_headers(message: Message) -> ConsumedHeaders | None:
    """The headers of a consumed record. The stub shares its type with what `produce` takes
    (also a mapping, also str values); a consumed record always has a list of bytes."""
    return cast(ConsumedHeaders | None, message.headers())


def consume_available(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Wait up to `timeout_s` for a record, then take up to `max_messages` in all of those
    already fetched. (`Consumer.consume(n, timeout)` waits out its whole timeout unless
    n records arrive, which holds back every record at low rates.)"""
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    if max_messages == 1:
        return [first]
    return [first, *consumer.consume(max_messages - 1, timeout=0)]
