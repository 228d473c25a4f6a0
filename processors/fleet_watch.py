"""Feeds a `FleetLoad` from Kafka, off the processor's event loop, on two daemon threads:

- `fleet-starts` reads `imagegen.events` from its end and times the arrival of each
  `started` event. Arrival times on this machine's clock, not the events' own: the workers'
  clocks may disagree with ours, and a reader that does nothing else times arrivals within
  one fetch wait.
- `fleet-backlog` reads, every `refresh_s`, the lag of each render queue's worker group
  (end offsets minus committed offsets, `group_lag`: its consumers never join the groups)
  and hands it to the load with the start rate.

A failed read is logged and retried at the next refresh; the load stops estimating once
its reading grows stale, so a broker outage turns shedding off rather than freezing it.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from confluent_kafka import OFFSET_END, KafkaException, Message, TopicPartition

from imagegen.infra.kafka import EndOffsets, consume_available, make_consumer
from imagegen.infra.metrics import FLEET_START_RATE, group_lag
from imagegen.infra.settings import Settings
from imagegen.processors.load import FleetLoad, StartRate
from imagegen.schemas import JobEvent, decode
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage
from imagegen.schemas.events import EventType
from imagegen.schemas.topics import EVENTS, RENDER, RENDER_BATCH, WORKER_GROUPS

log = logging.getLogger(__name__)

# How an encoded `started` event spells its type: most events are progress, and only the
# ones that may be starts are worth decoding.
_STARTED = b'"type":"started"'


class FleetWatch:
    def __init__(self, settings: Settings, load: FleetLoad) -> None:
        self._settings = settings
        self._load = load
        self._starts = StartRate()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Self:
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._read_starts, name="fleet-starts", daemon=True),
            threading.Thread(target=self._read_backlog, name="fleet-backlog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            # Bounded: with the broker gone a thread may sit in a call for its timeout. They
            # are daemons, and their consumers hold nothing anyone waits for.
            thread.join(timeout=2.0)
        self._threads = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _read_starts(self) -> None:
        consumer = make_consumer(
            self._settings,
            group_id="imagegen-fleet-watch",  # never joined nor committed: assigned partitions
            **{"enable.auto.commit": False},
        )
        try:
            # From the end: the rate is measured from now on (history would need a broker
            # that answers offsets-for-times correctly; Tansu 0.6.0 does not).
            while not self._stopping.is_set():
                try:
                    metadata = consumer.list_topics(EVENTS, timeout=10).topics[EVENTS]
                    break
                except KafkaException as exc:
                    log.warning("cannot read %s yet: %s", EVENTS, exc)
            else:
                return
            consumer.assign([TopicPartition(EVENTS, p, OFFSET_END) for p in metadata.partitions])
            while not self._stopping.is_set():
                starts = sum(map(_is_start, consume_available(consumer, 500, 0.2)))
                if starts:
                    self._starts.add(starts)
        except Exception:
            log.exception("stopped reading %s: the fleet's throughput goes unmeasured", EVENTS)
        finally:
            consumer.close()

    def _read_backlog(self) -> None:
        consumers = {
            topic: make_consumer(self._settings, group, **{"enable.auto.commit": False})
            for topic, group in WORKER_GROUPS.items()
        }
        ends = EndOffsets(self._settings)
        try:
            while not self._stopping.is_set():
                mark = self._load.mark()
                try:
                    interactive, batch = (
                        sum(group_lag(consumers[topic], ends, [topic]).values())
                        for topic in (RENDER, RENDER_BATCH)
                    )
                except (KafkaException, BrokerUnavailable) as exc:
                    log.warning("the fleet's backlog was not refreshed: %s", exc)
                else:
                    per_s = self._starts.per_s()
                    FLEET_START_RATE.set(per_s or 0.0)
                    self._load.observe(mark, interactive, batch, per_s)
                self._stopping.wait(self._load.refresh_s)
        finally:
            ends.close()
            for consumer in consumers.values():
                consumer.close()


def _is_start(message: Message) -> bool:
    value = message.value()
    if message.error() is not None or value is None or _STARTED not in value:
        return False
    try:
        return decode(JobEvent, value).type is EventType.STARTED
    except InvalidMessage:
        return False  # a bad event is the watchers' loss, not ours
