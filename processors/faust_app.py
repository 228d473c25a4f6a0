"""The faust App the processor runs: faust's own, with two behaviours corrected and its
fixed fetch wait made a setting (`IMAGEGEN_KAFKA_FETCH_WAIT_MS`).

1. Flow control never drops events it has already fetched. faust's
   `FlowControlEvent.resume()` always clears every stream buffer, and faust resumes flow
   twice after a rebalance: once to read the changelogs, and again once the tables are
   recovered, after seeking the stream partitions to their committed offsets. Events fetched
   between the seek and the second resume sit in the agent's buffer, and the consumer's read
   offset has already moved past them, so clearing the buffer loses them: they are never
   processed, never acked, and the partition's commit stalls at the gap. (Reproduced
   against faust-streaming 0.15.3 by restarting a processor while requests wait on every
   partition.) Clearing is right only when flow was suspended: the buffers then hold events
   of revoked partitions, which the next owner reads again.

2. Table recovery reads each changelog to the end a fetch reports. faust asks ListOffsets
   where a changelog ends and stops reading there. Some Kafka-protocol brokers (Tansu 0.6.0,
   the embedded one) answer with an offset inside the last multi-record batch, and recovery
   would then miss the newest table updates (see `imagegen.infra.kafka.fetched_end_offsets`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import aiokafka
import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer, Transport
from faust.types import TP, AppT, ConsumerT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from imagegen.infra.kafka import fetched_end_offsets
from imagegen.infra.settings import Settings


class KeepBuffersOnResume(FlowControlEvent):
    def resume(self) -> None:
        if self.is_active():
            return
        super().resume()


class ConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # faust fixes the fetch wait at 1.5 s; IMAGEGEN_KAFKA_FETCH_WAIT_MS says why not.
        consumer._fetch_max_wait_ms = _settings(self.app).kafka_fetch_wait_ms
        return consumer


class FetchedEndsConsumer(Consumer):
    """faust asks its consumer for `highwaters` only to know where table recovery ends."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        settings = _settings(self.app)
        ends = await asyncio.to_thread(
            fetched_end_offsets, settings, [(tp.topic, tp.partition) for tp in partitions]
        )
        return {tp: ends[(tp.topic, tp.partition)] for tp in partitions}


class App(faust.App):
    def __init__(self, app_id: str, *, settings: Settings, **options: Any) -> None:
        self.settings_for_clients = settings
        super().__init__(app_id, **options)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeepBuffersOnResume(loop=self.loop)

    def _new_consumer(self) -> ConsumerT:
        return FetchedEndsConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.loop,
        )


def _settings(app: AppT) -> Settings:
    # faust types a consumer's app as its interface; these consumers are only ever App's.
    return cast(App, app).settings_for_clients
