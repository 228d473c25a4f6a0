"""How the deliverer waits for a retry to come due without waiting for anything else.

A retry topic's partition whose next record is not due yet is paused and rewound to that
record; it is resumed when the record comes due, and the record is read again then. The
consumer goes on polling meanwhile (staying in its group) and reading every other partition,
so a delivery waiting an hour holds back only the records behind it in its own partition,
which are due no sooner (`webhooks.schedule`). No thread ever sleeps for a delivery.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, TopicPartition

Where = tuple[str, int]  # (topic, partition)


class DueGate:
    """Used by the consumer's thread only."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._waiting: dict[Where, float] = {}  # paused partition -> when it comes due (monotonic)

    def holds(self, where: Where) -> bool:
        """Whether `where` is paused: records of it polled before the pause are read again."""
        return where in self._waiting

    def wait(self, where: Where, offset: int, due_in_s: float) -> None:
        """Pause `where` and rewind it to `offset`, until `due_in_s` from now."""
        partition = TopicPartition(where[0], where[1], offset)
        self._consumer.pause([partition])
        self._consumer.seek(partition)
        self._waiting[where] = time.monotonic() + due_in_s

    def release_due(self) -> None:
        now = time.monotonic()
        due = [where for where, at in self._waiting.items() if at <= now]
        if due:
            self._consumer.resume([TopicPartition(topic, partition) for topic, partition in due])
            for where in due:
                del self._waiting[where]

    def forget(self, revoked: Iterable[Where]) -> None:
        """Revoked partitions: their next owner reads them from the last commit.

        The paused ones among them are resumed before they go: librdkafka keeps a
        partition paused across its revocation and return, so one that came back here
        would otherwise never be read again."""
        held = [where for where in revoked if self._waiting.pop(where, None) is not None]
        if held:
            self._consumer.resume([TopicPartition(topic, partition) for topic, partition in held])

    def next_due_in_s(self, longest_s: float) -> float:
        """How long the poll may wait before a paused partition comes due."""
        if not self._waiting:
            return longest_s
        return max(0.0, min(longest_s, min(self._waiting.values()) - time.monotonic()))
