"""Follow `imagegen.results`: wait for given requests' answers, or read them as they come.

A subscriber reads every partition with `assign()`, never in a consumer group: each reader
wants all results, and nothing is committed. Each request's first final result wins: at
least once delivery can publish a result twice, always with the same content.

Where it starts:
- `start="end"`: what the broker reports as each partition's end when the subscriber is
  created. Create the subscriber before publishing, and no answer can slip past it. (Some
  brokers report an end slightly before the true one; that only means a few old results
  are read again and skipped.)
- `start="beginning"`: everything retained.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, Self

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from imagegen.infra.kafka import consume_available, make_consumer
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
    def __init__(self, settings: Settings, start: Start = "end") -> None:
        self._consumer: Consumer = make_consumer(
            settings, group_id="imagegen-results-reader", **{"enable.auto.commit": False}
        )
        metadata = self._consumer.list_topics(RESULTS, timeout=10)
        partitions = sorted(metadata.topics[RESULTS].partitions)
        self._ends = {p: self._end_of(p) for p in partitions}
        self._starts = {p: 0 if start == "beginning" else end for p, end in self._ends.items()}
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
        pending = set(self._ends)
        while pending:
            yield from self._poll(1.0)
            pending = {p for p in pending if not self._caught_up(p)}

    def wait_for(
        self,
        request_ids: Iterable[str],
        timeout_s: float,
        on_result: Callable[[GenerationResult], None] | None = None,
    ) -> dict[str, GenerationResult]:
        """The first result of each request; `ResultTimeout` names those still missing."""
        wanted = set(request_ids)
        found: dict[str, GenerationResult] = {}
        deadline = time.monotonic() + timeout_s
        while wanted - found.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout(sorted(wanted - found.keys()), timeout_s, found)
            for result in self._poll(min(remaining, 0.5)):
                if result.request_id in wanted and result.request_id not in found:
                    found[result.request_id] = result
                    if on_result is not None:
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

    def _caught_up(self, partition: int) -> bool:
        """Some brokers (Tansu) answer "where does it end" with an offset inside the last
        batch; the end that a fetch response carries is the true one. So a partition is
        caught up only once a fetch has answered and the position has passed both."""
        tp = TopicPartition(RESULTS, partition)
        (position,) = self._consumer.position([tp])
        at = position.offset if position.offset >= 0 else self._starts[partition]
        _low, fetched_end = self._consumer.get_watermark_offsets(tp, cached=True)
        return fetched_end >= 0 and at >= max(self._ends[partition], fetched_end)


def _decoded(value: bytes | None) -> GenerationResult | None:
    try:
        return decode(GenerationResult, value)
    except InvalidMessage:
        return None  # another writer's mistake must not stop every reader
