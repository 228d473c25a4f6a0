"""Changelog recovery that reads to the true end of each partition.

faust rebuilds a table by reading its changelog up to the "high watermark" that ListOffsets
reports. Some Kafka-protocol brokers (Tansu 0.6.0, the embedded broker) report an offset
inside the last multi-record batch there, so faust stops early and silently drops the newest
table updates: dedupe memory and rate-limit buckets would come back stale after a restart.

The high watermark a Fetch response carries is right on those brokers too. So before
recovery, `install()` has faust confirm each non-empty partition's end by fetching its last
record with a short-lived consumer, and takes the larger of the two answers. On Apache Kafka
both agree, and the only cost is one fetch per changelog partition at start-up.

This replaces a private method of faust's aiokafka driver, which is why pyproject.toml pins
faust-streaming below 0.16; tests/test_processor.py restarts a real processor and fails if
recovery loses an update.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

log = logging.getLogger(__name__)
_listoffsets_highwaters = faust_aiokafka.AIOKafkaConsumerThread._highwaters
_FETCH_ROUNDS = 20
_FETCH_TIMEOUT_MS = 250


async def _confirmed_highwaters(
    self: faust_aiokafka.AIOKafkaConsumerThread, partitions: list[TP]
) -> Mapping[TP, int]:
    highwaters = dict(await _listoffsets_highwaters(self, partitions))
    nonempty = {
        aiokafka.TopicPartition(tp.topic, tp.partition): tp
        for tp in partitions
        if highwaters.get(tp)
    }
    if not nonempty:
        return highwaters
    conf = self.app.conf
    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=faust_aiokafka.server_list(
            self.transport.url, self.transport.default_port
        ),
        enable_auto_commit=False,
        **faust_aiokafka.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
    )
    await probe.start()
    try:
        probe.assign(list(nonempty))
        for partition, tp in nonempty.items():
            probe.seek(partition, highwaters[tp] - 1)
        pending = set(nonempty)
        for _ in range(_FETCH_ROUNDS):
            if not pending:
                break
            await probe.getmany(*pending, timeout_ms=_FETCH_TIMEOUT_MS)
            for partition in list(pending):
                fetched = probe.highwater(partition)
                if fetched is not None:
                    tp = nonempty[partition]
                    highwaters[tp] = max(highwaters[tp], fetched)
                    pending.discard(partition)
    finally:
        await probe.stop()
    if pending:
        log.warning("could not confirm the end of %s; recovery may miss its last records", pending)
    return highwaters


def install() -> None:
    faust_aiokafka.AIOKafkaConsumerThread._highwaters = _confirmed_highwaters
