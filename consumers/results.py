"""Follow `imagegen.results`: wait for given requests' answers, or read them as they come.

A request's state is its latest result. A request can have several: at least once
delivery can publish one twice, and a failed request that an operator replays from the
DLQ is answered again (failed, then succeeded). Both producers key results by request id
and partition them with Kafka's murmur2 (`infra.partitioning`), so all of a request's
results lie in one partition, in the order they were written: the one read last is the
latest.

A subscriber reads with `assign()`, never in a consumer group: each reader wants all
results, and nothing is committed. It reads every partition, or, given `request_ids`, only
the partitions where those requests' results land.

Where it starts:
- `start="end"`: what the broker reports as each partition's end when the subscriber is
  created. Create the subscriber before publishing, and no answer can slip past it. (Some
  brokers report an end slightly before the true one; that only means a few old results
  are read again.)
- `start="beginning"`: everything retained.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, Self

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from imagegen.infra.kafka import consume_available, make_consumer
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, decode
from imagegen.schemas.errors import ImagegenError, InvalidMessage
from imagegen.schemas.topics import RESULTS

Start = Literal["beginning", "end"]


class ResultTimeout(ImagegenError):
    """Some awaited requests had no result in time."""

    transient = True

    def __init__(
        self, missing: list[str], timeout_s: float, found: dict[str, GenerationResult]
    ) -> None:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        super().__init__(
            f"no result within {timeout_s:g}s for {len(missing)} request(s): {shown}. "
            "Check that a processor and a worker are running (`imagegen processor`, "
            "`imagegen worker`), or wait longer with a larger timeout."
        )
        self.missing = missing
        self.found = found


class ResultSubscriber:
    def __init__(
        self,
        settings: Settings,
        start: Start = "end",
        request_ids: Iterable[str] | None = None,
    ) -> None:
        self._consumer: Consumer = make_consumer(
            settings, group_id="imagegen-results-reader", **{"enable.auto.commit": False}
        )
        metadata = self._consumer.list_topics(RESULTS, timeout=10)
        partitions = sorted(metadata.topics[RESULTS].partitions)
        if request_ids is not None:
            # GenerationResult.kafka_key: the request id's bytes.
            partitions = sorted({partition_for(i.encode(), len(partitions)) for i in request_ids})
        self._ends = {p: self._end_of(p) for p in partitions}
        self._starts = {p: 0 if start == "beginning" else end for p, end in self._ends.items()}
        self._read_up_to: dict[int, int] = {}  # by partition, once a fetch has answered
        self._consumer.assign(
            [
                TopicPartition(RESULTS, p, OFFSET_BEGINNING if start == "beginning" else end)
                for p, end in self._ends.items()
            ]
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()

    def follow(self, poll_s: float = 0.5) -> Iterator[GenerationResult]:
        """Every result from the start on, forever; unreadable records are skipped."""
        while True:
            yield from self._poll(poll_s)

    def until_caught_up(self) -> Iterator[GenerationResult]:
        """The results up to the ends reported when the subscriber was created, then stop."""
        while not self._is_caught_up():
            yield from self._poll(1.0)

    def wait_for(
        self,
        request_ids: Iterable[str],
        timeout_s: float,
        on_result: Callable[[GenerationResult], None] | None = None,
    ) -> dict[str, GenerationResult]:
        """Each request's latest result, once every one has a result and the subscriber has
        read up to where it started (so a retained result cannot hide a newer one).
        `on_result` sees each request's first result as it arrives. `ResultTimeout` names
        the requests still missing."""
        wanted = set(request_ids)
        found: dict[str, GenerationResult] = {}
        deadline = time.monotonic() + timeout_s
        while wanted - found.keys() or not self._is_caught_up():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if wanted - found.keys():
                    raise ResultTimeout(sorted(wanted - found.keys()), timeout_s, found)
                return found  # every request answered; the broker was slow to say where it ends
            for result in self._poll(min(remaining, 0.5)):
                if result.request_id not in wanted:
                    continue
                first = result.request_id not in found
                found[result.request_id] = result
                if first and on_result is not None:
                    on_result(result)
        return found

    async def wait_for_async(
        self, request_ids: Iterable[str], timeout_s: float
    ) -> dict[str, GenerationResult]:
        """`wait_for` for asyncio: the blocking polls run in a worker thread."""
        return await asyncio.to_thread(self.wait_for, list(request_ids), timeout_s)

    def _poll(self, timeout_s: float) -> Iterator[GenerationResult]:
        for message in consume_available(self._consumer, 500, timeout_s):
            if message.error() is None:
                result = _decoded(message.value())
                if result is not None:
                    yield result

    def _end_of(self, partition: int) -> int:
        _low, high = self._consumer.get_watermark_offsets(
            TopicPartition(RESULTS, partition), timeout=10
        )
        return high

    def _is_caught_up(self) -> bool:
        return all(self._partition_caught_up(p) for p in self._ends)

    def _partition_caught_up(self, partition: int) -> bool:
        """Some brokers (Tansu) answer "where does it end" with an offset inside the last
        batch; the end that a fetch response carries is the true one. So a partition is
        caught up once the position has passed both the reported end and the end of the
        first fetch that answered. (That first fetch, not the latest: under steady traffic
        the latest end keeps moving, and a reader must still stop.)"""
        tp = TopicPartition(RESULTS, partition)
        if partition not in self._read_up_to:
            _low, fetched_end = self._consumer.get_watermark_offsets(tp, cached=True)
            if fetched_end < 0:
                return False  # no fetch has answered yet
            self._read_up_to[partition] = max(self._ends[partition], fetched_end)
        (position,) = self._consumer.position([tp])
        at = position.offset if position.offset >= 0 else self._starts[partition]
        return at >= self._read_up_to[partition]


def latest_results(results: Iterable[GenerationResult]) -> dict[str, GenerationResult]:
    """Each request's latest result among `results` (read in offset order, as a subscriber
    reads them), in the order those latest results came."""
    latest: dict[str, GenerationResult] = {}
    for result in results:
        latest.pop(result.request_id, None)  # re-inserted: ordered by its latest result
        latest[result.request_id] = result
    return latest


def latest_result(settings: Settings, request_id: str) -> GenerationResult | None:
    """The request's latest result retained on `imagegen.results`, or None if it has none;
    only the one partition where its results land is read."""
    latest = None
    with ResultSubscriber(settings, start="beginning", request_ids=[request_id]) as subscriber:
        for result in subscriber.until_caught_up():
            if result.request_id == request_id:
                latest = result  # read in offset order: a later one is newer
    return latest


def _decoded(value: bytes | None) -> GenerationResult | None:
    try:
        return decode(GenerationResult, value)
    except InvalidMessage:
        return None  # another writer's mistake must not stop every reader
