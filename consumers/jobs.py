"""A record of `imagegen.render` or `imagegen.render.batch` on its way through the worker,
and where it came from."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import cast

from confluent_kafka import Message

from imagegen.consumers.crashes import Crashes, Record
from imagegen.consumers.inputs import EditInputs
from imagegen.consumers.progress import ProgressThrottle
from imagegen.infra.logs import log_context
from imagegen.infra.tracing import Span
from imagegen.schemas import GenerationRequest
from imagegen.schemas.headers import ADMITTED_AT_HEADER

log = logging.getLogger(__name__)

#: The latest admission time taken from a header: the year 9999, in epoch milliseconds.
MAX_EPOCH_MS = 253_402_300_799_999

#: Headers as a consumed record carries them.
ConsumedHeaders = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Polled:
    """Where a consumed record lives, and its partition's assignment epoch (`generation`)
    it was polled in: once its partition is revoked or lost, its completion is ignored,
    because the partition's next owner does the work again."""

    topic: str
    partition: int
    offset: int
    generation: int

    @classmethod
    def of(cls, message: Message, epochs: Mapping[tuple[str, int], int]) -> Polled:
        """Where `message` lives, in its partition's current epoch of `epochs` (-1 for a
        partition not held: a record fetched just before its partition was revoked)."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        # Only error events lack these, and the poll loop passes none of those on.
        if topic is None or partition is None or offset is None:
            raise ValueError("a consumed record has no topic, partition or offset")
        return cls(topic, partition, offset, epochs.get((topic, partition), -1))

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass
class Job:
    """One request on its way through the worker, from its record."""

    message: Message
    polled: Polled
    request: GenerationRequest
    admitted_at_ms: int
    span: Span
    crashes: Crashes = field(default_factory=Crashes)  # left by processes that died on it
    render_started_ms: int | None = None  # when its first render began
    timings: dict[str, float] = field(default_factory=dict)
    #: Its shares of the renders it took part in; None until one ran.
    device_ms: float | None = None
    progress: ProgressThrottle = field(default_factory=ProgressThrottle)
    #: An edit's checked input image and mask, read before it is queued to render.
    inputs: EditInputs | None = None

    @property
    def record(self) -> Record:
        """The job's record, as the crash ledger names it."""
        where = self.polled
        return Record(where.topic, where.partition, where.offset, self.request.request_id)

    def log_context(self) -> AbstractContextManager[None]:
        """Every line logged in the block names the request, its record and its trace."""
        return log_context(
            request_id=self.request.request_id,
            user_id=self.request.user_id,
            topic=self.polled.topic,
            partition=self.polled.partition,
            offset=self.polled.offset,
            trace_id=self.span.trace_id,
        )


def consumed_headers(message: Message) -> ConsumedHeaders:
    # confluent-kafka types headers as a list or a dict; a consumed record's are a list.
    return cast(ConsumedHeaders, message.headers() or [])


def admitted_at_ms(message: Message) -> int:
    """When the processor admitted the record (its header), else the record's timestamp.

    Anyone who may write `imagegen.render` can set the header to anything, so a value that
    is not a time in epoch milliseconds is ignored, with a warning: a header never stops
    the worker."""
    for name, value in consumed_headers(message):
        if name != ADMITTED_AT_HEADER or value is None:
            continue
        admitted = _epoch_ms(value)
        if admitted is not None:
            return admitted
        log.warning(
            "ignoring the %s header of %s[%s]@%s: %r is not a time in epoch milliseconds",
            ADMITTED_AT_HEADER,
            message.topic(),
            message.partition(),
            message.offset(),
            value[:40],
        )
    return message.timestamp()[1]


def _epoch_ms(value: bytes) -> int | None:
    # Digits only: int() also takes signs, spaces and underscores, and a value too long
    # to be a time would overflow the float arithmetic of the result's timings.
    if not value.isdigit() or len(value) > len(str(MAX_EPOCH_MS)):
        return None
    admitted = int(value)
    return admitted if admitted <= MAX_EPOCH_MS else None


def now_ms() -> int:
    """Wall-clock milliseconds: the clock of record timestamps and of `submitted_at`."""
    return int(time.time() * 1000)
