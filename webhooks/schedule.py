"""When a failed webhook is tried again, and in which retry topic it waits meanwhile.

Backoff is exponential with jitter: attempt n (n >= 1 failed so far) waits
IMAGEGEN_WEBHOOK_FIRST_RETRY_S x 10^(n-1), at most 1,000 times the first, plus up to a
quarter more at random, so that the deliveries of one outage do not all come back at once.
Each delay has its own topic (`schemas.topics.WEBHOOK_RETRIES`): everything in one topic
waits about as long, so a topic's oldest record is always the first one due, and a reader
that waits for its head holds back nothing that is due sooner. (Jitter bends that by at
most a quarter of the delay.) Retries stop once IMAGEGEN_WEBHOOK_RETRY_S has passed since
the first attempt: the delivery is then dead-lettered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from imagegen.infra.settings import Settings
from imagegen.schemas.topics import WEBHOOK_RETRIES

_GROWTH = 10
_JITTER = 0.25


@dataclass(frozen=True)
class Retry:
    topic: str
    not_before: datetime


def next_retry(
    settings: Settings, failed_attempts: int, first_attempt_at: datetime, now: datetime
) -> Retry | None:
    """Where and until when the delivery waits after `failed_attempts` failures; None once
    the budget is spent (or would be, before the next attempt)."""
    tier = min(max(failed_attempts, 1), len(WEBHOOK_RETRIES)) - 1
    delay_s = settings.webhook_first_retry_s * _GROWTH**tier
    delay_s *= 1 + random.uniform(0, _JITTER)
    not_before = now + timedelta(seconds=delay_s)
    if not_before > first_attempt_at + timedelta(seconds=settings.webhook_retry_s):
        return None
    return Retry(WEBHOOK_RETRIES[tier], not_before)


def deferred(settings: Settings, now: datetime) -> Retry:
    """For a delivery put off before any attempt (its user has too many in flight): the
    shortest wait, whatever the budget."""
    delay_s = settings.webhook_first_retry_s * (1 + random.uniform(0, _JITTER))
    return Retry(WEBHOOK_RETRIES[0], now + timedelta(seconds=delay_s))
