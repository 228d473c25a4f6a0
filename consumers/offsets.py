"""Which offsets of each partition may be committed while work finishes out of order.

Requests of one partition finish out of order: they batch with different company, and a
retried one finishes after those behind it. Kafka commits one offset per partition meaning
"everything before this is done", so the committable offset is the oldest offset still in
flight, or one past the newest seen when nothing is in flight.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class _Partition:
    in_flight: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # in-flight offsets, oldest on top
    next_offset: int | None = None  # one past the newest offset seen


class OffsetTracker:
    """Not thread-safe: one thread (the worker's poll loop) owns it."""

    def __init__(self) -> None:
        self._partitions: dict[int, _Partition] = {}

    def started(self, partition: int, offset: int) -> None:
        state = self._partitions.setdefault(partition, _Partition())
        state.in_flight.add(offset)
        heapq.heappush(state.heap, offset)
        state.next_offset = max(state.next_offset or 0, offset + 1)

    def finished(self, partition: int, offset: int) -> int | None:
        """Mark `offset` done; return the partition's new committable offset when it moved."""
        state = self._partitions.get(partition)
        if state is None or offset not in state.in_flight:
            return None  # the partition was revoked since: its new owner redoes the work
        before = self._committable(state)
        state.in_flight.discard(offset)
        while state.heap and state.heap[0] not in state.in_flight:
            heapq.heappop(state.heap)
        after = self._committable(state)
        return after if after != before else None

    def forget(self, partitions: list[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def in_flight(self) -> int:
        return sum(len(state.in_flight) for state in self._partitions.values())

    @staticmethod
    def _committable(state: _Partition) -> int | None:
        return state.heap[0] if state.heap else state.next_offset
