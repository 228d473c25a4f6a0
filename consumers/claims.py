"""Claims on object keys: at most one job per image in flight.

A request can be in flight twice on one worker: replayed from the DLQ, or read again after a
rebalance while its first attempt still runs. Both attempts aim at the same object key
(`imagegen.consumers.storage.object_key`), so the second waits behind the first instead of
rendering the same image again. When the first lets go, the jobs that waited are checked
again and find its stored image (unless it failed, in which case one of them renders it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Claims(Generic[T]):
    """The keys held by jobs in flight, with the jobs that wait for each. Thread-safe."""

    def __init__(self, key: Callable[[T], str]) -> None:
        self._key = key
        self._held: dict[str, tuple[T, list[T]]] = {}  # key -> (holder, waiting behind it)
        self._lock = threading.Lock()

    def claim(self, job: T) -> bool:
        """Take the job's key; False when another job holds it, and `job` now waits for it."""
        key = self._key(job)
        with self._lock:
            if key in self._held:
                self._held[key][1].append(job)
                return False
            self._held[key] = (job, [])
            return True

    def release(self, job: T) -> list[T]:
        """Free the job's key if `job` holds it, and hand back the jobs that waited for it,
        oldest first; they wait no longer. Nothing changes (and [] comes back) for a job
        that holds no claim: it failed before claiming, or waits behind another."""
        key = self._key(job)
        with self._lock:
            holder, waiting = self._held.get(key, (None, []))
            if holder is not job:
                return []
            del self._held[key]
        return waiting
