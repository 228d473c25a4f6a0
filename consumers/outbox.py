"""The worker's outbox: the producer that sends the worker's records (results, dead letters,
job events), the thread that serves their delivery reports, and which offsets those reports
finish.

The rule, enforced in `Sends`: an offset of `imagegen.render` is finished only once every
record produced for it is settled, which is to say acknowledged by the broker (and its
`on_acknowledged` callback has run). The records of an offset are sent inside one
`Outbox.sending` block, which holds the offset open until it ends: an acknowledgement that
arrives before the block's last send cannot finish it early. A block that raises leaves its
offset unfinished: it is never stored, and the partition's next owner reads the record again.

A record that fails, because its produce raises or its delivery reports an error, is sent
again by the delivery thread after a backoff, up to `IMAGEGEN_MAX_ATTEMPTS` attempts in all.
One that still fails is undeliverable: it never settles, so its offset is never finished
(nor stored), and `on_undeliverable` stops the worker, so that the record is read again by
the next one. No record the worker produces is dropped silently, and none can hold its
partition's commits for ever while the worker looks healthy.

Records for watching only (a job's `started` and `progress` events) belong to no offset:
`notify` sends them once, and a failure is the caller's to count, never a reason to hold an
offset or stop the worker. They share the producer, so they keep their order with the
records of the offsets (a job's `finished` event, sent with its result, comes after them).

The poll loop takes the finished offsets (`finished`) and stores them in partition order
(`imagegen.consumers.offsets`). Any thread may send; the delivery thread serves the reports
from `start` until `close`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from imagegen.consumers.broker_errors import what_to_fix
from imagegen.consumers.jobs import Polled
from imagegen.consumers.retry import RetryPolicy
from imagegen.consumers.threads import vital_thread
from imagegen.infra.kafka import ProduceHeaders
from imagegen.infra.metrics import RECORDS_PRODUCED

log = logging.getLogger(__name__)

#: Runs in the delivery thread once the broker has acknowledged a record.
OnAcknowledged = Callable[[], None]

QUEUE_FULL_WAIT_S = 0.01
CLOSE_WAIT_S = 30.0


@dataclass(eq=False)
class _Record:
    """A record to produce for an offset, as often as it takes."""

    sends: Sends
    topic: str
    key: bytes | None
    value: bytes | None
    headers: ProduceHeaders | None
    on_acknowledged: OnAcknowledged | None
    attempt: int = field(default=1)

    def describe(self) -> str:
        size = len(self.value or b"") + len(self.key or b"")
        return f"a {size}-byte record to {self.topic} for {self.sends.polled}"


class Sends:
    """The records produced for one offset, and how many of them are not settled yet; a
    context manager that holds the offset open while its block runs (see `Outbox.sending`).
    """

    def __init__(self, outbox: Outbox, polled: Polled) -> None:
        self.polled = polled
        self._outbox = outbox
        self._unsettled = 1  # the block's own hold, until the block ends
        self._lock = threading.Lock()  # sends and delivery reports come from several threads

    def __enter__(self) -> Sends:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        if error_type is None:  # after an exception, the offset must stay unfinished
            self.settle()

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        on_acknowledged: OnAcknowledged | None = None,
    ) -> None:
        """Produce a record for the offset; `on_acknowledged` runs once the broker has it.

        Only the offset's `sending` block may send: anything later would come after the
        offset is finished (and perhaps committed)."""
        with self._lock:
            if self._unsettled == 0:
                raise RuntimeError(f"{self.polled} is finished: nothing more may be sent for it")
            self._unsettled += 1
        record_headers: ProduceHeaders | None = list(headers) or None
        self._outbox.produce(_Record(self, topic, key, value, record_headers, on_acknowledged))

    def settle(self) -> None:
        with self._lock:
            self._unsettled -= 1
            finished = self._unsettled == 0
        if finished:
            self._outbox.finish(self.polled)


class Outbox:
    def __init__(
        self, producer: Producer, policy: RetryPolicy, on_undeliverable: Callable[[str], None]
    ) -> None:
        """`on_undeliverable` is called, with what happened and what to fix, for a record that
        cannot be written; it must stop the worker."""
        self._producer = producer
        self._policy = policy
        self._on_undeliverable = on_undeliverable
        self._finished: queue.SimpleQueue[Polled] = queue.SimpleQueue()
        # Records to send again, by when: (monotonic due time, tie-breaker, record).
        self._resends: list[tuple[float, int, _Record]] = []
        self._resend_order = itertools.count()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._delivery: threading.Thread | None = None

    def start(self, on_crash: Callable[[], None]) -> None:
        """Start the delivery thread; `on_crash` runs in it should it ever crash."""
        self._delivery = vital_thread("delivery", self._deliver_until_closed, on_crash)
        self._delivery.start()

    def sending(self, polled: Polled) -> Sends:
        """`with outbox.sending(polled) as sends:` send the records of `polled` in the block;
        it is finished once the block has ended and they have all settled."""
        return Sends(self, polled)

    def notify(
        self, topic: str, key: bytes, value: bytes, on_failure: Callable[[str], None]
    ) -> None:
        """Produce a record that belongs to no offset, once: never sent again, never waited
        for. `on_failure` runs, with what went wrong, if it cannot be queued (the local
        queue is full: nothing here may wait for room) or the broker does not acknowledge it.
        """

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                RECORDS_PRODUCED.labels(topic).inc()
            else:
                on_failure(error.str())

        try:
            self._producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            on_failure(str(exc) or type(exc).__name__)

    def finished(self) -> list[Polled]:
        """The offsets finished since the last call, in the order they finished."""
        offsets: list[Polled] = []
        while True:
            try:
                offsets.append(self._finished.get_nowait())
            except queue.Empty:
                return offsets

    def close(self) -> None:
        """Wait (up to 30 s) until everything sent has settled or been given up, then stop
        the delivery thread."""
        self._closing.set()
        if self._delivery is not None:
            self._delivery.join()

    # ---- for `Sends` ----------------------------------------------------------------------

    def produce(self, record: _Record) -> None:
        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                self._failed(record, error)
                return
            RECORDS_PRODUCED.labels(record.topic).inc()
            if record.on_acknowledged is not None:
                record.on_acknowledged()
            record.sends.settle()

        while True:
            try:
                self._producer.produce(
                    record.topic,
                    key=record.key,
                    value=record.value,
                    headers=record.headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # The local queue is full until the delivery thread serves reports, so that
                # thread must never wait for it: it tries again after its next poll.
                if threading.current_thread() is self._delivery:
                    self._resend(record, QUEUE_FULL_WAIT_S)
                    return
                time.sleep(QUEUE_FULL_WAIT_S)
            except KafkaException as exc:
                self._failed(record, exc.args[0])
                return

    def finish(self, polled: Polled) -> None:
        self._finished.put(polled)

    # ---- failures and the delivery thread ---------------------------------------------------

    def _failed(self, record: _Record, error: KafkaError) -> None:
        if record.attempt >= self._policy.max_attempts:
            # Never settled: the offset stays unfinished, and the record is read again.
            self._on_undeliverable(
                f"Cannot write {record.describe()} after {record.attempt} attempt(s) "
                f"(IMAGEGEN_MAX_ATTEMPTS): {what_to_fix(error)}"
            )
            return
        delay = self._policy.delay(record.attempt)
        log.warning(
            "could not write %s (attempt %d), sending it again in %.2fs: %s",
            record.describe(),
            record.attempt,
            delay,
            error.str(),
        )
        record.attempt += 1
        self._resend(record, delay)

    def _resend(self, record: _Record, delay_s: float) -> None:
        with self._lock:
            due = time.monotonic() + delay_s
            heapq.heappush(self._resends, (due, next(self._resend_order), record))

    def _due_resends(self) -> list[_Record]:
        due: list[_Record] = []
        with self._lock:
            while self._resends and self._resends[0][0] <= time.monotonic():
                due.append(heapq.heappop(self._resends)[2])
        return due

    def _deliver_until_closed(self) -> None:
        deadline = math.inf
        while True:
            self._producer.poll(0.05)
            for record in self._due_resends():
                self.produce(record)
            if self._closing.is_set():
                deadline = min(deadline, time.monotonic() + CLOSE_WAIT_S)
                if self._idle() or time.monotonic() > deadline:
                    return

    def _idle(self) -> bool:
        """Nothing waits for the broker nor to be sent again."""
        with self._lock:
            return not self._resends and len(self._producer) == 0
