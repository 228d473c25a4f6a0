"""Operator tooling for `imagegen.dlq`: read the dead letters, select some, replay them.

Reading assigns every partition of the DLQ (no consumer group: nothing is committed, and a
group join can be slow on the embedded broker) and stops at the end as it was when the read
began, so a listing always finishes.

A replay republishes each selected dead letter's original key, value and headers to its
original topic, partitioned by key like any publish, plus the header `replay.of` naming the
DLQ entry it came from. The processor admits a replayed request again even when it admitted
the same request id before.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from imagegen.infra.kafka import (
    ProduceHeaders,
    consumed_headers,
    make_admin,
    make_consumer,
    make_producer,
    record_position,
)
from imagegen.infra.settings import Settings
from imagegen.infra.topics import TOPICS
from imagegen.schemas import DeadLetter, Stage
from imagegen.schemas.errors import BrokerUnavailable, ImagegenError, InvalidMessage
from imagegen.schemas.headers import REPLAY_HEADER
from imagegen.schemas.topics import DLQ

__all__ = ["Entry", "Filters", "ReplaySummary", "read_dlq", "replay"]
#: Where a replay may publish. The DLQ itself is no original topic.
REPLAYABLE_TOPICS = frozenset(spec.name for spec in TOPICS) - {DLQ}

ReplayProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Entry:
    """One record of `imagegen.dlq`: a dead letter, or `problem` says why it is none."""

    partition: int
    offset: int
    timestamp_ms: int | None
    letter: DeadLetter | None
    problem: str = ""
    request_id: str | None = None

    @classmethod
    def from_message(cls, message: Message) -> Self:
        _topic, partition, offset = record_position(message)
        kind, timestamp = message.timestamp()
        where = (partition, offset, None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp)
        try:
            letter = DeadLetter.from_kafka(
                message.key(), message.value(), consumed_headers(message)
            )
        except InvalidMessage as exc:
            return cls(*where, letter=None, problem=str(exc))
        return cls(*where, letter=letter, request_id=_request_id(letter.value))

    @property
    def coordinates(self) -> str:
        return f"{DLQ}/{self.partition}/{self.offset}"


def _request_id(value: bytes | None) -> str | None:
    """The `request_id` of a JSON object, valid request or not; None for anything else."""
    try:
        document = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    found = document.get("request_id") if isinstance(document, dict) else None
    return found if isinstance(found, str) else None


@dataclass(frozen=True)
class Filters:
    """Which entries to select; every filter given must hold.

    - `request_id`: the `request_id` field of the original value, when it is a JSON object.
    - `error_class`: the full name (`imagegen.schemas.errors.InvalidMessage`) or the last part
      (`InvalidMessage`).
    - `since` (inclusive) and `until` (exclusive) bound `failed_at`; both need a timezone.
    - `partition`, `from_offset`, `to_offset` (inclusive) are DLQ coordinates: the offset
      range applies within `partition`, or within every partition when none is given.

    Unreadable entries match only filters on DLQ coordinates.
    """

    request_id: str | None = None
    error_class: str | None = None
    stage: Stage | None = None
    since: datetime | None = None
    until: datetime | None = None
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            moment: datetime | None = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name}={moment} needs a timezone, e.g. {moment}+00:00")

    @property
    def selects_everything(self) -> bool:
        return self == Filters()

    def matches(self, entry: Entry) -> bool:
        if not self._in_range(entry):
            return False
        letter = entry.letter
        if letter is None:
            return not self._filters_content
        # A hand-written naive time must not crash the comparison; we write UTC.
        failed_at = (
            letter.failed_at if letter.failed_at.tzinfo else letter.failed_at.replace(tzinfo=UTC)
        )
        return (
            (self.request_id is None or entry.request_id == self.request_id)
            and (
                self.error_class is None
                or self.error_class in (letter.error_class, letter.error_class.rpartition(".")[2])
            )
            and (self.stage is None or letter.stage == self.stage)
            and (self.since is None or failed_at >= self.since)
            and (self.until is None or failed_at < self.until)
        )

    @property
    def _filters_content(self) -> bool:
        return any(
            value is not None
            for value in (self.request_id, self.error_class, self.stage, self.since, self.until)
        )

    def _in_range(self, entry: Entry) -> bool:
        return (
            (self.partition is None or entry.partition == self.partition)
            and (self.from_offset is None or entry.offset >= self.from_offset)
            and (self.to_offset is None or entry.offset <= self.to_offset)
        )


def read_dlq(
    settings: Settings, filters: Filters = Filters(), stall_timeout_s: float = 30.0
) -> Iterator[Entry]:
    """The entries of `imagegen.dlq` that match `filters`, up to its end when called.

    Raises `BrokerUnavailable` when no record arrives for `stall_timeout_s` before the end.
    """
    consumer = make_consumer(
        settings,
        group_id="imagegen-dlq-reader",
        **{"enable.auto.commit": False, "fetch.wait.max.ms": 100},
    )
    try:
        stops = _assign(consumer, filters)
        pending = set(stops)
        last_progress = time.monotonic()
        last_error = "none"
        while pending:
            message = consumer.poll(0.2)
            error = None if message is None else message.error()
            if message is not None and error is None:
                last_progress = time.monotonic()
                entry = Entry.from_message(message)
                if filters.matches(entry):
                    yield entry
            elif error is not None:
                # librdkafka recovers from the others by itself; the stall check bounds them.
                last_error = error.str()
                if error.fatal():
                    raise BrokerUnavailable(f"reading {DLQ} failed: {last_error}")
            pending = {p for p in pending if not _finished(consumer, p, stops[p])}
            if pending and time.monotonic() - last_progress > stall_timeout_s:
                raise BrokerUnavailable(
                    f"reading {DLQ} stalled for {stall_timeout_s:g}s with partitions "
                    f"{sorted(pending)} unfinished (last error: {last_error}); check the broker at "
                    f"{settings.kafka_bootstrap} (`imagegen stack status`)"
                )
    finally:
        consumer.close()


@dataclass(frozen=True)
class _Stop:
    start: int
    high: int  # the high watermark when the read began
    last: int | None  # the last offset wanted, when the filters bound it


def _assign(consumer: Consumer, filters: Filters) -> dict[int, _Stop]:
    """Assign the partitions that may hold matches; return where each one's read stops."""
    try:
        topic = consumer.list_topics(DLQ, timeout=10).topics[DLQ]
    except KafkaException as exc:
        raise BrokerUnavailable(f"no metadata for {DLQ}: {exc.args[0].str()}") from exc
    if topic.error is not None:
        raise ImagegenError(
            f"cannot read {DLQ}: {topic.error.str()}; create the topics with `imagegen init`"
        )
    partitions = sorted(topic.partitions)
    if filters.partition is not None and filters.partition not in partitions:
        raise ImagegenError(
            f"{DLQ} has partitions {partitions[0]}-{partitions[-1]}; "
            f"there is no partition {filters.partition}"
        )
    stops = {}
    for partition in partitions:
        if filters.partition is not None and partition != filters.partition:
            continue
        low, high = consumer.get_watermark_offsets(TopicPartition(DLQ, partition), timeout=10)
        start = max(low, filters.from_offset or 0)
        if filters.to_offset is None or start <= filters.to_offset:
            stops[partition] = _Stop(start, high, filters.to_offset)
    consumer.assign([TopicPartition(DLQ, p, stop.start) for p, stop in stops.items()])
    return stops


def _finished(consumer: Consumer, partition: int, stop: _Stop) -> bool:
    """Whether the read of `partition` has reached its stop.

    Tansu's ListOffsets can report a high watermark inside the last batch, so records may
    exist past it. A fetch response carries the true one, which librdkafka caches: a
    partition is finished once the position reaches both, and only after a fetch answered.
    """
    tp = TopicPartition(DLQ, partition)
    (position,) = consumer.position([tp])
    # Before the first record arrives the position is unset: the read still starts there.
    at = position.offset if position.offset >= 0 else stop.start
    if stop.last is not None and at > stop.last:
        return True
    _low, fetched_high = consumer.get_watermark_offsets(tp, cached=True)
    return fetched_high >= 0 and at >= max(stop.high, fetched_high)


@dataclass
class ReplaySummary:
    """What a replay did. On a dry run `replayed` holds what would have been replayed."""

    dry_run: bool
    selected: int
    replayed: list[Entry] = field(default_factory=list)
    skipped: list[tuple[Entry, str]] = field(default_factory=list)
    failed: list[tuple[Entry, str]] = field(default_factory=list)


def replay(
    settings: Settings,
    entries: Sequence[Entry],
    *,
    dry_run: bool = False,
    rate: float | None = None,
    progress: ReplayProgress | None = None,
    delivery_timeout_s: float = 30.0,
) -> ReplaySummary:
    """Republish `entries` to their original topics; return once every delivery reported.

    `rate` caps the messages per second (None: as fast as the broker takes them).
    `progress(done, total)` is called after each entry.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate={rate} must be above 0 messages per second, or None")
    summary = ReplaySummary(dry_run=dry_run, selected=len(entries))
    existing = _existing_topics(settings)
    # librdkafka then reports every message, delivered or timed out, within the timeout.
    producer = (
        None
        if dry_run
        else make_producer(settings, **{"message.timeout.ms": int(delivery_timeout_s * 1000)})
    )
    pending: dict[str, Entry] = {}
    pacer = _Pacer(rate)
    for done, entry in enumerate(entries, start=1):
        reason = _skip_reason(entry, existing)
        if reason:
            summary.skipped.append((entry, reason))
        elif producer is None:
            summary.replayed.append(entry)
        else:
            pacer.wait(producer)
            _publish(producer, entry, pending, summary)
        if progress is not None:
            progress(done, len(entries))
    if producer is not None:
        producer.flush(delivery_timeout_s + 5.0)
        summary.failed.extend(
            (entry, f"no delivery report within {delivery_timeout_s:g}s")
            for entry in pending.values()
        )
    return summary


def _existing_topics(settings: Settings) -> set[str]:
    try:
        return set(make_admin(settings).list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"no metadata from {settings.kafka_bootstrap}: {exc.args[0].str()}"
        ) from exc


def _skip_reason(entry: Entry, existing: set[str]) -> str:
    if entry.letter is None:
        return f"unreadable entry ({entry.problem})"
    topic = entry.letter.original_topic
    if topic not in REPLAYABLE_TOPICS:
        return f"original topic {topic} is not a pipeline topic"
    if topic not in existing:
        return f"original topic {topic} does not exist; create it with `imagegen init`"
    return ""


def _publish(
    producer: Producer, entry: Entry, pending: dict[str, Entry], summary: ReplaySummary
) -> None:
    letter = entry.letter
    assert letter is not None  # _skip_reason let only dead letters through
    # A letter replayed before carries the older entry's name; this copy comes from this one.
    headers: ProduceHeaders = [
        (name, data) for name, data in letter.original_headers if name != REPLAY_HEADER
    ]
    headers.append((REPLAY_HEADER, entry.coordinates.encode()))

    def delivered(error: KafkaError | None, _message: Message) -> None:
        del pending[entry.coordinates]
        if error is None:
            summary.replayed.append(entry)
        else:
            summary.failed.append((entry, error.str()))

    pending[entry.coordinates] = entry
    while True:
        try:
            producer.produce(
                letter.original_topic,
                key=letter.key,
                value=letter.value,
                headers=headers,
                on_delivery=delivered,
            )
            break
        except BufferError:
            producer.poll(0.5)  # the local queue is full: let deliveries drain it
        except KafkaException as exc:
            del pending[entry.coordinates]
            summary.failed.append((entry, exc.args[0].str()))
            break
    producer.poll(0)


class _Pacer:
    """Spaces sends at least 1/rate apart; a late send does not let the next ones burst."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 0.0 if rate is None else 1.0 / rate
        self._next = time.monotonic()

    def wait(self, producer: Producer) -> None:
        while (left := self._next - time.monotonic()) > 0:
            producer.poll(left)  # serves delivery reports while it waits
        self._next = max(self._next, time.monotonic()) + self._interval
