"""Read keyed answers from some topics, as every follower of a request does.

A `TopicReader` reads with `assign()`, never in a consumer group: each reader wants every
record, and nothing is committed. It reads every partition of its topics, or, given keys,
only the partitions where those keys land: producers partition with murmur2
(`infra.partitioning`), so all records of one key lie in one partition, in the order they
were written.

Where it starts:
- `start="end"`: what the broker reports as each partition's end when the reader is created.
  Create it before publishing, and no answer can slip past it. (Some brokers report an end
  slightly before the true one; that only means a few old records are read again.)
- `start="beginning"`: everything retained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Literal, Self, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from pydantic import BaseModel

from imagegen.infra.kafka import consume_available, make_consumer
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings
from imagegen.schemas import decode
from imagegen.schemas.errors import InvalidMessage

Start = Literal["beginning", "end"]
Model = TypeVar("Model", bound=BaseModel)
Item = TypeVar("Item")
_Where = tuple[str, int]  # (topic, partition)


class TopicReader:
    def __init__(
        self,
        settings: Settings,
        group_id: str,
        topics: Sequence[str],
        start: Start = "end",
        keys: Iterable[bytes] | None = None,
    ) -> None:
        self._consumer: Consumer = make_consumer(
            settings, group_id=group_id, **{"enable.auto.commit": False}
        )
        wanted = None if keys is None else list(keys)
        where = [(topic, p) for topic in topics for p in self._partitions(topic, wanted)]
        self._ends = {w: self._end_of(w) for w in where}
        self._starts = {w: 0 if start == "beginning" else end for w, end in self._ends.items()}
        self._read_up_to: dict[_Where, int] = {}  # once a fetch has answered
        self._consumer.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING if start == "beginning" else end)
                for (topic, p), end in self._ends.items()
            ]
        )

    def poll(self, timeout_s: float) -> list[Message]:
        """Wait up to `timeout_s` for records, then take those already fetched."""
        messages = consume_available(self._consumer, 500, timeout_s)
        return [message for message in messages if message.error() is None]

    def caught_up(self) -> bool:
        """Whether every partition has been read up to where it ended at creation."""
        return all(self._partition_caught_up(w) for w in self._ends)

    def close(self) -> None:
        self._consumer.close()

    def _partitions(self, topic: str, keys: list[bytes] | None) -> list[int]:
        count = len(self._consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        if keys is None:
            return list(range(count))
        return sorted({partition_for(key, count) for key in keys})

    def _end_of(self, where: _Where) -> int:
        _low, high = self._consumer.get_watermark_offsets(TopicPartition(*where), timeout=10)
        return high

    def _partition_caught_up(self, where: _Where) -> bool:
        """Some brokers (Tansu) answer "where does it end" with an offset inside the last
        batch; the end that a fetch response carries is the true one. So a partition is
        caught up once the position has passed both the reported end and the end of the
        first fetch that answered. (That first fetch, not the latest: under steady traffic
        the latest end keeps moving, and a reader must still stop.)"""
        tp = TopicPartition(*where)
        if where not in self._read_up_to:
            _low, fetched_end = self._consumer.get_watermark_offsets(tp, cached=True)
            if fetched_end < 0:
                return False  # no fetch has answered yet
            self._read_up_to[where] = max(self._ends[where], fetched_end)
        (position,) = self._consumer.position([tp])
        at = position.offset if position.offset >= 0 else self._starts[where]
        return at >= self._read_up_to[where]


class Subscription(ABC, Generic[Item]):
    """What every follower built on a `TopicReader` shares: closing it, and reading its
    items (`_poll`) forever or up to where the topics ended at creation."""

    def __init__(self, reader: TopicReader) -> None:
        self._reader = reader

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    def follow(self, poll_s: float = 0.5) -> Iterator[Item]:
        """Every item from the start on, forever; unreadable records are skipped."""
        while True:
            yield from self._poll(poll_s)

    def until_caught_up(self) -> Iterator[Item]:
        """The items up to the ends reported when the subscription was created, then stop."""
        while not self._reader.caught_up():
            yield from self._poll(1.0)

    @abstractmethod
    def _poll(self, timeout_s: float) -> Iterator[Item]:
        """The items among the records read within `timeout_s`."""


def readable(model: type[Model], value: bytes | None) -> Model | None:
    """`value` as `model`, or None when it is not one."""
    try:
        return decode(model, value)
    except InvalidMessage:
        return None  # another writer's mistake must not stop every reader
