"""What the worker fetches: interactive work first, batch work only while none waits, and
nothing more while too much is in flight.

The worker reads two topics, each in its own group: `imagegen.render` (interactive) and
`imagegen.render.batch` (batch), through a consumer each (`imagegen.consumers.clients`).
`FetchGate`, run by the poll loop after every poll, pauses and resumes their partitions:
- back-pressure: every partition pauses once the worker has `max_in_flight` requests in
  flight (queued, rendering, finishing), and resumes once it is down to half of that.
  Fetching stops, polling does not: the consumer stays in its group however long the work
  in flight takes (an outage of the object store, say).
- priority: the batch partitions pause while interactive work waits (records of
  `imagegen.render` not yet handed to the worker, from the fetched high watermarks, or
  interactive jobs queued for the render thread), and while `batch_cap` batch jobs are in
  flight, until half of them are done. The cap keeps room under `max_in_flight` for
  interactive work, and a poll never takes more batch records than the cap has room for
  (`poll_limit`), so that one poll cannot overshoot it.
- the render thread's queue hands out interactive jobs first (`rank`, and
  `imagegen.consumers.batching`), and never batches the two kinds together.

Batch work can starve while interactive work keeps coming; its deadline bounds the wait,
and it ends `expired` (`imagegen.consumers.lifecycle`). Pausing drops what librdkafka had
fetched for the partition; it is fetched again on resume, from the position the worker
reached, so nothing is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from confluent_kafka import Consumer, TopicPartition

from imagegen.schemas.topics import RENDER, RENDER_BATCH

log = logging.getLogger(__name__)

#: The topics the worker reads, interactive first.
TOPICS = (RENDER, RENDER_BATCH)
#: Ranks: the render thread's queue hands out lower ranks first.
INTERACTIVE, BATCH = 0, 1


def rank(topic: str) -> int:
    """The rank of a record by the topic it came from (the processor routes by priority)."""
    return BATCH if topic == RENDER_BATCH else INTERACTIVE


def unread(consumer: Consumer, partitions: list[TopicPartition]) -> int:
    """Records of `partitions` that the consumer has not handed over yet, by the high
    watermarks of its latest fetches. A partition that has handed over nothing yet counts
    none: its first fetch, which is never paused for this, shows its backlog."""
    if not partitions:
        return 0
    total = 0
    for position in consumer.position(partitions):
        if position.offset < 0:
            continue
        _low, high = consumer.get_watermark_offsets(position, cached=True)
        total += max(0, high - position.offset)
    return total


class FetchGate:
    """Owned by the poll loop, which alone touches the consumer."""

    def __init__(
        self,
        consumers: Mapping[str, Consumer],
        max_in_flight: int,
        batch_cap: int,
        interactive_queued: Callable[[], int],
    ) -> None:
        """`consumers` reads each of `TOPICS`; `interactive_queued` counts the interactive
        jobs waiting for the render thread."""
        self._consumers = consumers
        self._max_in_flight = max_in_flight
        self._batch_cap = batch_cap
        self._interactive_queued = interactive_queued
        self._full = False  # back-pressure: too much in flight
        self._batch_full = False  # the batch cap was reached, and half of it is not done
        self._paused: set[str] = set()

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """A rebalance added `partitions` (already assigned) to the consumer of their topic:
        pause them if the gate holds the topic paused, and resume them otherwise, since
        librdkafka keeps a partition paused across its revocation and return. Cooperative
        rebalances add to an assignment and leave the rest of it as it was."""
        for topic, consumer in self._consumers.items():
            added = [tp for tp in partitions if tp.topic == topic]
            if added:
                (consumer.pause if topic in self._paused else consumer.resume)(added)

    def poll_limit(self, in_flight: int, batch_in_flight: int) -> int:
        """How many records the next poll may take."""
        room = self._max_in_flight - in_flight
        if RENDER_BATCH not in self._paused:
            room = min(room, self._batch_cap - batch_in_flight)
        return max(1, room)

    def update(self, in_flight: int, batch_in_flight: int) -> None:
        """Pause and resume partitions for what is in flight now."""
        if in_flight >= self._max_in_flight:
            self._full = True
        elif in_flight <= self._max_in_flight // 2:
            self._full = False
        if batch_in_flight >= self._batch_cap:
            self._batch_full = True
        elif batch_in_flight <= self._batch_cap // 2:
            self._batch_full = False
        paused = set(TOPICS) if self._full else set()
        if not self._full and (self._batch_full or self._interactive_waiting()):
            paused.add(RENDER_BATCH)
        self._apply(paused, in_flight)

    def _interactive_waiting(self) -> bool:
        if self._interactive_queued() > 0:
            return True
        interactive = self._consumers[RENDER]
        return unread(interactive, interactive.assignment()) > 0

    def _apply(self, paused: set[str], in_flight: int) -> None:
        if paused == self._paused:
            return
        for topic in TOPICS:
            consumer = self._consumers[topic]
            if topic in paused and topic not in self._paused:
                log.debug("pausing %s: %d request(s) in flight", topic, in_flight)
                consumer.pause(consumer.assignment())
            elif topic in self._paused and topic not in paused:
                log.debug("resuming %s: %d request(s) in flight", topic, in_flight)
                consumer.resume(consumer.assignment())
        self._paused = paused
