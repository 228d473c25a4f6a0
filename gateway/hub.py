"""What happens to jobs right now, for every route of this gateway instance.

One thread reads imagegen.events and imagegen.results, every partition, from where they
ended when the hub started (`assign`, no consumer group: every instance reads everything,
so any instance can answer for any job). It keeps the live state of recent jobs (admitted,
running, the latest progress, queue position, the result) in a bounded LRU, and hands each
update to the asyncio watchers of that job (`loop.call_soon_threadsafe`), which exist only
while a request waits on the job (a submission's decision, `Prefer: wait`, an event stream).

Memory stays bounded: `capacity` states, the oldest dropped first; a job's history lives in
the job store (`gateway.job_store`), which the indexer keeps. A job the hub forgot, or saw
only ending (`LiveState.result_known`), is read from the store: `queued` until its result
is indexed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Self

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from imagegen.infra.kafka import consume_available, fetched_end_offsets, make_consumer
from imagegen.infra.settings import Settings
from imagegen.schemas import EventType, GenerationResult, JobEvent, Status, decode
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage
from imagegen.schemas.topics import EVENTS, RESULTS

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 100_000
_BATCH = 500


@dataclass(frozen=True)
class LiveState:
    """What the hub saw of one job."""

    admitted: bool = False
    started_at: datetime | None = None
    step: int | None = None
    steps: int | None = None
    queue_position: int | None = None
    estimated_start_at: datetime | None = None
    result: GenerationResult | None = None
    #: Whether a `finished` event came: the job ended, whether or not `result` came yet.
    finished: bool = False

    @property
    def result_known(self) -> bool:
        """Whether `result` is the job's latest as far as anyone knows: the hub saw it, or
        saw the job on its way and not its end, so it will see the result. A job seen only
        ending (its result came before the hub started, or went with an evicted state)
        needs the job store."""
        if self.result is not None:
            return True
        return not self.finished and (self.admitted or self.running)

    @property
    def running(self) -> bool:
        return self.started_at is not None or self.step is not None

    @property
    def decided(self) -> bool:
        """Whether the intake decided: admitted (or further), or answered with a result."""
        return self.admitted or self.running or self.result is not None


class Watch:
    """The updates of one job, for one waiting request: `await watch.changed()`."""

    def __init__(self, hub: EventHub, request_id: str) -> None:
        self._hub = hub
        self.request_id = request_id
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    def state(self) -> LiveState | None:
        return self._hub.state(self.request_id)

    async def changed(self, timeout_s: float) -> bool:
        """Wait for the next update; False when `timeout_s` passed without one."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            return False
        self._changed.clear()
        return True


class EventHub:
    def __init__(self, settings: Settings, capacity: int = DEFAULT_CAPACITY) -> None:
        self._settings = settings
        self._capacity = capacity
        self._states: OrderedDict[str, LiveState] = OrderedDict()
        self._watchers: dict[str, set[tuple[asyncio.AbstractEventLoop, Watch]]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start following both topics from their current ends; return once assigned."""
        consumer = make_consumer(
            self._settings,
            group_id="imagegen-gateway-hub",  # never joined nor committed: assigned partitions
            **{"enable.auto.commit": False},
        )
        try:
            partitions = [
                (topic, partition)
                for topic in (EVENTS, RESULTS)
                for partition in consumer.list_topics(topic, timeout=timeout_s)
                .topics[topic]
                .partitions
            ]
            ends = fetched_end_offsets(self._settings, partitions, timeout_s)
            consumer.assign([TopicPartition(t, p, ends[(t, p)]) for t, p in partitions])
        except (KafkaException, BrokerUnavailable) as exc:
            consumer.close()
            raise BrokerUnavailable(
                f"the event hub could not read {EVENTS} and {RESULTS} ({exc}); is the broker "
                f"at {self._settings.kafka_bootstrap} up and provisioned (`imagegen stack up`)?"
            ) from exc
        self._thread = threading.Thread(
            target=self._run, args=(consumer,), name="event-hub", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def state(self, request_id: str) -> LiveState | None:
        with self._lock:
            return self._states.get(request_id)

    @contextmanager
    def watch(self, request_id: str) -> Iterator[Watch]:
        """Updates of `request_id` while the block runs (from an event loop's thread)."""
        watch = Watch(self, request_id)
        entry = (asyncio.get_running_loop(), watch)
        with self._lock:
            self._watchers.setdefault(request_id, set()).add(entry)
        try:
            yield watch
        finally:
            with self._lock:
                watchers = self._watchers.get(request_id)
                if watchers is not None:
                    watchers.discard(entry)
                    if not watchers:
                        del self._watchers[request_id]

    # ---- the reading thread ---------------------------------------------------------------

    def _run(self, consumer: Consumer) -> None:
        try:
            while not self._stopping.is_set():
                for message in consume_available(consumer, _BATCH, 0.1):
                    self._read(message)
        except Exception:
            log.exception("the event hub stopped reading: restart the gateway")
        finally:
            consumer.close()

    def _read(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            log.warning("event hub: %s", error)
            return
        try:
            if message.topic() == RESULTS:
                result = decode(GenerationResult, message.value())
                self._update(result.request_id, lambda s: replace(s, result=result))
            else:
                event = decode(JobEvent, message.value())
                self._update(event.request_id, lambda s: _apply(s, event))
        except InvalidMessage as exc:
            log.warning("event hub: skipping %s@%s: %s", message.topic(), message.offset(), exc)

    def _update(self, request_id: str, change: Callable[[LiveState], LiveState]) -> None:
        with self._lock:
            state = change(self._states.pop(request_id, LiveState()))
            self._states[request_id] = state
            while len(self._states) > self._capacity:
                self._states.popitem(last=False)
            watchers = list(self._watchers.get(request_id, ()))
        for loop, watch in watchers:
            with suppress(RuntimeError):  # its loop closed: the request is gone
                loop.call_soon_threadsafe(watch.notify)


def _apply(state: LiveState, event: JobEvent) -> LiveState:
    match event.type:
        case EventType.ADMITTED:
            # Admitted after a rejection: the retry of a rate-limited or shed request,
            # published again under its id; the rejection is history.
            rejected = state.result is not None and state.result.status is Status.REJECTED
            return replace(
                state,
                admitted=True,
                result=None if rejected else state.result,
                finished=False if rejected else state.finished,
                queue_position=event.queue_position,
                estimated_start_at=event.estimated_start_at,
            )
        case EventType.STARTED:
            return replace(state, admitted=True, started_at=event.at, queue_position=None)
        case EventType.PROGRESS:
            return replace(
                state,
                admitted=True,
                started_at=state.started_at or event.at,
                step=event.step,
                steps=event.steps,
                queue_position=None,
            )
        case EventType.FINISHED:
            # The result on imagegen.results is the answer; that the job ended tells
            # `result_known` that a missing one is in the job store, not on its way.
            return replace(state, finished=True)
