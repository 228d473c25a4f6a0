"""Token buckets: one per user, and one global bucket split across partitions.

A token is the work of one 512x512, 25-step image: a request costs
ceil(width * height * steps / (512 * 512 * 25)) tokens, at least 1, from both buckets.

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

# The work one token pays for: pixels * steps of a 512x512, 25-step image.
TOKEN_WORK = 512 * 512 * 25


def request_cost(width: int, height: int, steps: int) -> int:
    """Tokens a request costs: its pixels * steps in TOKEN_WORK, rounded up, at least 1."""
    return max(1, -(-width * height * steps // TOKEN_WORK))


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

    def wait_ms(self, limit: Limit, cost: float) -> int:
        """Milliseconds until this (refilled) bucket holds `cost` tokens."""
        return math.ceil(max(0.0, cost - self.tokens) / limit.per_s * 1000)


class RateLimiter:
    """Takes a request's cost from its user's bucket and the partition's share of the
    global one.

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

    def largest_cost(self, user_id: str) -> int:
        """The dearest request the user's bucket can ever pay for: a full burst."""
        return math.floor(self.limit_for(user_id).burst)

    def take(self, user_id: str, partition: int, cost: int, now: float) -> int | None:
        """Take `cost` tokens from both buckets and return None, or take nothing and return
        how many milliseconds until both would hold enough.

        The caller keeps `cost` within `largest_cost`, or the user's bucket never holds
        enough. A partition's share of the global burst can be smaller than that (it is the
        global burst split P ways, an artefact of partitioning, not the user's limit), so
        a request dearer than the share takes the whole share instead of waiting for ever.
        """
        checks = [
            (f"user:{user_id}", self.limit_for(user_id), float(cost)),
            (f"global:{partition}", self._global_share, min(cost, self._global_share.burst)),
        ]
        refilled = [
            (key, limit, price, self._load(key, limit, now).refilled(limit, now))
            for key, limit, price in checks
        ]
        if all(bucket.tokens >= price for _, _, price, bucket in refilled):
            for key, _, price, bucket in refilled:
                self._buckets[key] = [bucket.tokens - price, bucket.updated_at, partition]
            return None
        return max(bucket.wait_ms(limit, price) for _, limit, price, bucket in refilled)

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
