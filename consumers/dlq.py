"""Operator tooling for `imagegen.dlq`: read the dead letters, select some, replay them.

Reading assigns every partition of the DLQ (no consumer group: nothing is committed, and a
group join can be slow on the embedded broker) and stops at the end as it was when the read
began, so a listing always finishes. Entries are streamed: nothing here holds letters (a
letter may be a megabyte), only small index entries and summaries.

`FailedRecords` shows each failed record once, by its latest letter. A replay republishes
that letter's original key, value and headers (read back from the object store when the
letter spilled them) to its original topic, partitioned by key like any publish, plus the
header `replay.of`: the DLQ entry it came from, signed with IMAGEGEN_REPLAY_KEY
(`imagegen.infra.replay_marks`). The processor trusts only a mark it can verify: it admits
such a request again even when it admitted the same request id before. A record whose
replay failed again is skipped by the next replay unless asked, so replays can be re-run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
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

from imagegen.infra.dead_letter_spill import restore
from imagegen.infra.kafka import (
    ProduceHeaders,
    consumed_headers,
    make_admin,
    make_consumer,
    make_producer,
    record_position,
)
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.replay_marks import sign, verify
from imagegen.infra.settings import Settings
from imagegen.infra.topics import TOPICS
from imagegen.schemas import DeadLetter, Stage
from imagegen.schemas.errors import BrokerUnavailable, ImagegenError, InvalidMessage
from imagegen.schemas.headers import REPLAY_HEADER
from imagegen.schemas.topics import DLQ

__all__ = [
    "Entry",
    "FailedRecords",
    "Failure",
    "Filters",
    "ReplaySummary",
    "Replayed",
    "read_dlq",
    "replay",
]
#: Where a replay may publish. The DLQ itself is no original topic.
REPLAYABLE_TOPICS = frozenset(spec.name for spec in TOPICS) - {DLQ}

ReplayProgress = Callable[[int, int], None]
#: The largest record a replay sends. An original the broker took once may be over the
#: producers' default limit (1,000,000 bytes); the broker's own limit still applies.
MAX_REPLAY_BYTES = 8 * 1024 * 1024


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
    """Every entry of `imagegen.dlq` that matches `filters`, up to its end when called:
    letters that a replay superseded too (`FailedRecords` shows each record once).

    Raises `BrokerUnavailable` when no record arrives for `stall_timeout_s` before the end.
    """
    reader = _Reader(settings, stall_timeout_s)
    for entry in reader.read(lambda consumer: _plan(consumer, filters)):
        if filters.matches(entry):
            yield entry


@dataclass(frozen=True)
class Failure:
    """One failed record: its latest dead letter, and how many of its letters came from
    replays (a replay that succeeded leaves no letter, so it is not counted)."""

    latest: Entry
    replays: int
    first: str  # the DLQ coordinates of the record's first letter still in the DLQ


@dataclass(frozen=True)
class _Indexed:
    """What the index keeps of one letter: a few dozen bytes, never the letter."""

    parent: str | None  # the DLQ entry that the letter's verified replay mark names
    failed_at: float
    matches: bool


class FailedRecords:
    """The failed records of `imagegen.dlq` whose latest letter matches `filters`, each once.

    A replayed record that fails again gets a new letter, whose original headers carry the
    signed `replay.of` naming the letter it was replayed from: following those marks groups
    every letter of one failed record. Building this reads the DLQ once into an index of a
    few dozen bytes per letter; iterating reads it again, up to where the first read ended,
    and yields each record's latest letter as it passes. Neither read holds letters, so
    memory grows with the number of letters by their index entries only.
    """

    def __init__(
        self, settings: Settings, filters: Filters = Filters(), stall_timeout_s: float = 30.0
    ) -> None:
        self._settings = settings
        self._stall_timeout_s = stall_timeout_s
        index: dict[str, _Indexed] = {}
        reader = _Reader(settings, stall_timeout_s)
        for entry in reader.read(lambda consumer: _plan(consumer, Filters())):
            index[entry.coordinates] = _Indexed(
                _parent(entry, settings), _failed_at(entry), filters.matches(entry)
            )
        self._ends = reader.last_read
        self._starts = reader.starts
        #: Each shown record's latest letter: the record's (first letter, replays).
        self._latest = _latest_letters(index)

    def __len__(self) -> int:
        return len(self._latest)

    def __iter__(self) -> Iterator[Failure]:
        if not self._latest:
            return
        stops = {
            partition: _Stop(self._starts[partition], high=0, last=last)
            for partition, last in self._ends.items()
        }
        reader = _Reader(self._settings, self._stall_timeout_s)
        for entry in reader.read(lambda _consumer: stops):
            found = self._latest.get(entry.coordinates)
            if found is not None:
                first, replays = found
                yield Failure(entry, replays, first)


def _parent(entry: Entry, settings: Settings) -> str | None:
    mark = None if entry.letter is None else entry.letter.replay_mark()
    return None if mark is None else verify(mark, settings)


def _failed_at(entry: Entry) -> float:
    if entry.letter is not None:
        return entry.letter.failed_at.timestamp()
    return (entry.timestamp_ms or 0) / 1000


def _latest_letters(index: dict[str, _Indexed]) -> dict[str, tuple[str, int]]:
    """Group the letters by record; each matching group's latest letter: (first, replays)."""
    firsts: dict[str, str] = {}
    groups: dict[str, tuple[str, float, int]] = {}  # first: (latest, its failed_at, replays)
    for coordinates, indexed in index.items():
        first = _first_letter(coordinates, index, firsts)
        latest, failed_at, replays = groups.get(first, (coordinates, indexed.failed_at, 0))
        if indexed.failed_at >= failed_at:
            latest, failed_at = coordinates, indexed.failed_at
        groups[first] = (latest, failed_at, replays + (indexed.parent is not None))
    return {
        latest: (first, replays)
        for first, (latest, _, replays) in groups.items()
        if index[latest].matches
    }


def _first_letter(coordinates: str, index: dict[str, _Indexed], firsts: dict[str, str]) -> str:
    """The first letter of the record that the letter at `coordinates` is about: its replay
    marks followed back as far as the DLQ still holds letters. Results go into `firsts`."""
    chain = [coordinates]
    while (known := firsts.get(chain[-1])) is None:
        parent = index[chain[-1]].parent
        if parent is None or parent not in index or parent in chain:
            known = chain[-1]
            break
        chain.append(parent)
    for link in chain:
        firsts[link] = known
    return known


@dataclass(frozen=True)
class _Stop:
    start: int
    high: int  # the high watermark when the read began
    last: int | None  # the last offset wanted, when the filters bound it


class _Reader:
    """Reads `imagegen.dlq` between planned stops, one entry at a time.

    Assigns every planned partition (no consumer group: nothing is committed, and a group
    join can be slow on the embedded broker); `last_read` and `starts` say where the read
    went, so that a second read can cover exactly the same records.
    """

    def __init__(self, settings: Settings, stall_timeout_s: float) -> None:
        self._settings = settings
        self._stall_timeout_s = stall_timeout_s
        self.starts: dict[int, int] = {}
        self.last_read: dict[int, int] = {}

    def read(self, plan: Callable[[Consumer], dict[int, _Stop]]) -> Iterator[Entry]:
        """Raises `BrokerUnavailable` when no record arrives for the stall timeout."""
        consumer = make_consumer(
            self._settings,
            group_id="imagegen-dlq-reader",
            **{"enable.auto.commit": False, "fetch.wait.max.ms": 100},
        )
        try:
            stops = plan(consumer)
            self.starts = {partition: stop.start for partition, stop in stops.items()}
            consumer.assign([TopicPartition(DLQ, p, stop.start) for p, stop in stops.items()])
            yield from self._until_stops(consumer, stops)
        finally:
            consumer.close()

    def _until_stops(self, consumer: Consumer, stops: dict[int, _Stop]) -> Iterator[Entry]:
        pending = set(stops)
        last_progress = time.monotonic()
        last_error = "none"
        while pending:
            message = consumer.poll(0.2)
            error = None if message is None else message.error()
            if message is not None and error is None:
                last_progress = time.monotonic()
                entry = Entry.from_message(message)
                last = stops[entry.partition].last
                if last is None or entry.offset <= last:
                    self.last_read[entry.partition] = entry.offset
                    yield entry
            elif error is not None:
                # librdkafka recovers from the others by itself; the stall check bounds them.
                last_error = error.str()
                if error.fatal():
                    raise BrokerUnavailable(f"reading {DLQ} failed: {last_error}")
            pending = {p for p in pending if not _finished(consumer, p, stops[p])}
            if pending and time.monotonic() - last_progress > self._stall_timeout_s:
                raise BrokerUnavailable(
                    f"reading {DLQ} stalled for {self._stall_timeout_s:g}s with partitions "
                    f"{sorted(pending)} unfinished (last error: {last_error}); check the broker "
                    f"at {self._settings.kafka_bootstrap} (`imagegen stack status`)"
                )


def _plan(consumer: Consumer, filters: Filters) -> dict[int, _Stop]:
    """Where the read of each partition that may hold matches starts and stops."""
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


@dataclass(frozen=True)
class Replayed:
    """A replayed entry, as the summary keeps it (not the letter: it may be a megabyte)."""

    coordinates: str
    topic: str
    request_id: str | None


@dataclass
class ReplaySummary:
    """What a replay did, by DLQ coordinates. On a dry run `replayed` holds what would have
    been replayed."""

    dry_run: bool
    selected: int
    replayed: list[Replayed] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def replay(
    settings: Settings,
    records: FailedRecords,
    *,
    again: bool = False,
    dry_run: bool = False,
    rate: float | None = None,
    progress: ReplayProgress | None = None,
    delivery_timeout_s: float = 30.0,
) -> ReplaySummary:
    """Republish each record's latest letter to its original topic; return once every
    delivery reported.

    Idempotent: a record whose replay failed again (its latest letter came from a replay) is
    skipped, so running the same replay twice publishes nothing the second time. `again`
    replays those too, their latest letter only. `rate` caps the messages per second (None:
    as fast as the broker takes them). `progress(done, total)` is called after each record.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate={rate} must be above 0 messages per second, or None")
    summary = ReplaySummary(dry_run=dry_run, selected=len(records))
    existing = _existing_topics(settings)
    # librdkafka then reports every message, delivered or timed out, within the timeout.
    producer = (
        None
        if dry_run
        else make_producer(
            settings,
            **{
                "message.timeout.ms": int(delivery_timeout_s * 1000),
                "message.max.bytes": MAX_REPLAY_BYTES,
            },
        )
    )
    originals = _Originals(settings)
    pending: set[str] = set()
    pacer = _Pacer(rate)
    for done, failure in enumerate(records, start=1):
        entry = failure.latest
        reason = _skip_reason(failure, again, existing)
        if reason:
            summary.skipped.append((entry.coordinates, reason))
        elif producer is None:
            summary.replayed.append(_replayed(entry))
        else:
            pacer.wait(producer)
            _publish(settings, producer, entry, originals, pending, summary)
        if progress is not None:
            progress(done, summary.selected)
    if producer is not None:
        producer.flush(delivery_timeout_s + 5.0)
        summary.failed.extend(
            (coordinates, f"no delivery report within {delivery_timeout_s:g}s")
            for coordinates in pending
        )
    return summary


def _existing_topics(settings: Settings) -> set[str]:
    try:
        return set(make_admin(settings).list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"no metadata from {settings.kafka_bootstrap}: {exc.args[0].str()}"
        ) from exc


def _skip_reason(failure: Failure, again: bool, existing: set[str]) -> str:
    entry = failure.latest
    if entry.letter is None:
        return f"unreadable entry ({entry.problem})"
    if failure.replays and not again:
        return (
            f"replayed {failure.replays} time(s) already and failed again; pass --again to "
            "replay it once more"
        )
    topic = entry.letter.original_topic
    if topic not in REPLAYABLE_TOPICS:
        return f"original topic {topic} is not a pipeline topic"
    if topic not in existing:
        return f"original topic {topic} does not exist; create it with `imagegen init`"
    return ""


def _replayed(entry: Entry) -> Replayed:
    assert entry.letter is not None  # _skip_reason let only dead letters through
    return Replayed(entry.coordinates, entry.letter.original_topic, entry.request_id)


class _Originals:
    """Reads spilled originals back; the object-store client is made at the first one."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: ObjectStore | None = None

    def restore(self, letter: DeadLetter) -> DeadLetter:
        if letter.original_object is None:
            return letter
        if self._store is None:
            self._store = ObjectStore(self._settings)
        return restore(letter, self._store)


def _publish(
    settings: Settings,
    producer: Producer,
    entry: Entry,
    originals: _Originals,
    pending: set[str],
    summary: ReplaySummary,
) -> None:
    assert entry.letter is not None  # _skip_reason let only dead letters through
    coordinates = entry.coordinates
    try:
        letter = originals.restore(entry.letter)
    except ImagegenError as exc:
        summary.failed.append((coordinates, f"cannot read its original back: {exc}"))
        return
    # A letter replayed before carries the older entry's mark; this copy comes from this one.
    headers: ProduceHeaders = [
        (name, data) for name, data in letter.original_headers if name != REPLAY_HEADER
    ]
    headers.append((REPLAY_HEADER, sign(coordinates, settings)))
    replayed = _replayed(entry)

    def delivered(error: KafkaError | None, _message: Message) -> None:
        pending.discard(coordinates)
        if error is None:
            summary.replayed.append(replayed)
        else:
            summary.failed.append((coordinates, error.str()))

    pending.add(coordinates)
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
            pending.discard(coordinates)
            summary.failed.append((coordinates, exc.args[0].str()))
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
