"""Dynamic batching: hand out requests in groups that can share one forward pass."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ArrivalRate:
    """Arrivals per second lately: a count that decays with a time constant of `horizon_s`,
    divided by it. A burst of N arrivals counts as N arrivals over the horizon, so items
    that one fetch hands over together read as their real rate, not as an infinite one.
    """

    def __init__(self, horizon_s: float = 1.0) -> None:
        self._horizon_s = horizon_s
        self._count = 0.0  # decayed to `_at`
        self._at = 0.0

    def observe(self, at: float) -> None:
        """One arrival at `at` (monotonic seconds); out-of-order times count as the latest."""
        self._count = self._decayed(max(at, self._at)) + 1.0
        self._at = max(at, self._at)

    def per_second(self, at: float) -> float:
        return self._decayed(at) / self._horizon_s

    def _decayed(self, at: float) -> float:
        return self._count * math.exp(-max(0.0, at - self._at) / self._horizon_s)


class Batcher(Generic[T]):
    """A queue that hands out items in batches of equal `key`, best `rank` first (the lowest),
    and oldest first within a rank.

    A batch starts with the oldest waiting item of the best rank waiting, and takes every
    compatible item already waiting (items of one key should share a rank: the batch is
    taken by key alone). While it is short of `max_batch` it waits up to `max_wait_s` for
    more, but only when items have lately (over about a second) arrived at one per
    `max_wait_s` or faster: under sparse traffic the wait would add its whole length to
    every request's latency and find no company. A busy model needs no wait either: the
    items that arrive while it renders are waiting for the next batch already. Arrivals of
    every kind count, so under mixed traffic a wait may still find no company of the batch's
    kind; and since an item counts itself, a wait of a second or more is always taken.
    Incompatible items keep their place for the next batch. An item whose key is None
    batches with nothing, and waits for no company. `waiting` counts the items of a rank
    not yet handed out. Thread-safe for one consumer and any number of producers.
    """

    def __init__(
        self,
        key: Callable[[T], Hashable | None],
        max_batch: int,
        max_wait_s: float,
        rank: Callable[[T], int] = lambda _item: 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative (got {max_wait_s})")
        self._key = key
        self._rank = rank
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        # Each item with when it was put, so that arrivals are timed on the producers' side.
        self._incoming: queue.SimpleQueue[tuple[float, T]] = queue.SimpleQueue()
        self._held: list[T] = []  # taken from the queue, waiting for a batch of their kind
        self._arrivals = ArrivalRate()
        self._waiting: Counter[int] = Counter()  # by rank, put and not yet handed out
        self._lock = threading.Lock()

    def put(self, item: T) -> None:
        with self._lock:
            self._waiting[self._rank(item)] += 1
        self._incoming.put((time.monotonic(), item))

    def waiting(self, rank: int) -> int:
        """How many items of `rank` wait to be handed out; any thread may ask."""
        with self._lock:
            return self._waiting[rank]

    def next_batch(self, timeout_s: float) -> list[T]:
        """The next batch, or [] when nothing arrives within `timeout_s`."""
        return self._handed_out(self._next_batch(timeout_s))

    def drain(self) -> list[T]:
        """Everything still waiting, removed."""
        self._hold_waiting()
        waiting, self._held = self._held, []
        return self._handed_out(waiting)

    def _next_batch(self, timeout_s: float) -> list[T]:
        self._hold_waiting()
        if not self._held:
            try:
                self._held.append(self._arrived(self._incoming.get(timeout=timeout_s)))
            except queue.Empty:
                return []
        first = min(range(len(self._held)), key=lambda i: self._rank(self._held[i]))
        kind = self._key(self._held[first])
        if kind is None:
            return [self._held.pop(first)]
        batch = self._take(kind, self._max_batch)
        started = time.monotonic()
        if self._arrivals.per_second(started) * self._max_wait_s < 1:
            return batch
        deadline = started + self._max_wait_s
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._arrived(self._incoming.get(timeout=remaining))
            except queue.Empty:
                break
            (batch if self._key(item) == kind else self._held).append(item)
        return batch

    def _handed_out(self, items: list[T]) -> list[T]:
        with self._lock:
            self._waiting.subtract(self._rank(item) for item in items)
        return items

    def _arrived(self, stamped: tuple[float, T]) -> T:
        at, item = stamped
        self._arrivals.observe(at)
        return item

    def _hold_waiting(self) -> None:
        while True:
            try:
                self._held.append(self._arrived(self._incoming.get_nowait()))
            except queue.Empty:
                return

    def _take(self, kind: Hashable, limit: int) -> list[T]:
        batch: list[T] = []
        kept: list[T] = []
        for item in self._held:
            (batch if len(batch) < limit and self._key(item) == kind else kept).append(item)
        self._held = kept
        return batch
