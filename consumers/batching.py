"""Dynamic batching: hand out requests in groups that can share one forward pass."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """A queue that hands out items in batches of equal `key`, oldest first.

    A batch starts with the oldest waiting item and takes every compatible item already
    waiting; while it is short of `max_batch` it waits up to `max_wait_s` for more.
    Incompatible items keep their place for the next batch. Thread-safe for one consumer
    and any number of producers.
    """

    def __init__(self, key: Callable[[T], Hashable], max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative (got {max_wait_s})")
        self._key = key
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._incoming: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._held: list[T] = []  # taken from the queue, waiting for a batch of their kind

    def put(self, item: T) -> None:
        self._incoming.put(item)

    def next_batch(self, timeout_s: float) -> list[T]:
        """The next batch, or [] when nothing arrives within `timeout_s`."""
        self._hold_waiting()
        if not self._held:
            try:
                self._held.append(self._incoming.get(timeout=timeout_s))
            except queue.Empty:
                return []
        kind = self._key(self._held[0])
        batch = self._take(kind, self._max_batch)
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._incoming.get(timeout=remaining)
            except queue.Empty:
                break
            (batch if self._key(item) == kind else self._held).append(item)
        return batch

    def drain(self) -> list[T]:
        """Everything still waiting, removed."""
        self._hold_waiting()
        waiting, self._held = self._held, []
        return waiting

    def _hold_waiting(self) -> None:
        while True:
            try:
                self._held.append(self._incoming.get_nowait())
            except queue.Empty:
                return

    def _take(self, kind: Hashable, limit: int) -> list[T]:
        batch: list[T] = []
        kept: list[T] = []
        for item in self._held:
            (batch if len(batch) < limit and self._key(item) == kind else kept).append(item)
        self._held = kept
        return batch
