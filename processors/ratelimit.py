"""Token buckets: one per user, and one global bucket split across partitions.

Requests are keyed by user_id, so each user's bucket lives in exactly one partition and is
exact however many processors run. The global limit cannot be exact without coordination
between instances, so each partition holds an equal share of it: rate/P tokens per second
and burst/P tokens (at least 1) for P partitions. The shares' rates add up to the global
rate whatever the number of instances, but a hot partition is held to its share even while
others idle, and bursts round up to 1 token (see README, "Rate limits").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from imagegen.infra.settings import Settings
from imagegen.processors.state import Store


@dataclass(frozen=True)
class Limit:
    per_s: float
    burst: float


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated_at: float

    def refilled(self, limit: Limit, now: float) -> Bucket:
        elapsed = max(0.0, now - self.updated_at)  # a clock step backwards refills nothing
        return Bucket(min(limit.burst, self.tokens + elapsed * limit.per_s), now)

    def wait_ms(self, limit: Limit) -> int:
        """Milliseconds until this (refilled) bucket holds one token."""
        return math.ceil(max(0.0, 1.0 - self.tokens) / limit.per_s * 1000)


class RateLimiter:
    """Takes tokens from a user's bucket and the partition's share of the global one.

    `buckets` maps "user:<id>" and "global:<partition>" to [tokens, updated_at, partition];
    a faust table in the processor, so the buckets survive restarts. A bucket that has
    refilled to its burst is the same as none, so it can be forgotten (`full`).
    """

    def __init__(self, settings: Settings, buckets: Store, partitions: int) -> None:
        self._buckets = buckets
        self._default = Limit(settings.rate_user_per_s, settings.rate_user_burst)
        self._overrides = {
            user: Limit(override.per_s, override.burst)
            for user, override in settings.rate_user_overrides.items()
        }
        self._global_share = Limit(
            settings.rate_global_per_s / partitions,
            max(1.0, settings.rate_global_burst / partitions),
        )

    def limit_for(self, user_id: str) -> Limit:
        return self._overrides.get(user_id, self._default)

    def take(self, user_id: str, partition: int, now: float) -> int | None:
        """Take one token from both buckets and return None, or take nothing and return
        how many milliseconds until both would have a token."""
        checks = [
            (f"user:{user_id}", self.limit_for(user_id)),
            (f"global:{partition}", self._global_share),
        ]
        refilled = [
            (key, limit, self._load(key, limit, now).refilled(limit, now)) for key, limit in checks
        ]
        if all(bucket.tokens >= 1.0 for _, _, bucket in refilled):
            for key, _, bucket in refilled:
                self._buckets[key] = [bucket.tokens - 1.0, bucket.updated_at, partition]
            return None
        return max(bucket.wait_ms(limit) for _, limit, bucket in refilled)

    def full(self, entries: Iterable[tuple[str, list]], now: float) -> list[tuple[str, int]]:
        """The keys among `entries` (key, stored bucket) whose buckets have refilled to their
        burst by `now`, with each one's partition: forgetting them changes no decision."""
        forgettable = []
        for key, stored in entries:
            if len(stored) < 3:
                continue  # written before buckets recorded their partition
            kind, _, name = key.partition(":")
            limit = self.limit_for(name) if kind == "user" else self._global_share
            if Bucket(*stored[:2]).refilled(limit, now).tokens >= limit.burst:
                forgettable.append((key, stored[2]))
        return forgettable

    def _load(self, key: str, limit: Limit, now: float) -> Bucket:
        stored = self._buckets.get(key)
        return Bucket(*stored[:2]) if stored is not None else Bucket(limit.burst, now)
