"""The worker's outbox: the producer that sends the worker's records (results, dead letters),
the thread that serves their delivery reports, and which offsets those reports finish.

The rule, enforced in `Sends`: an offset of `imagegen.render` is finished only once every
record produced for it is settled, which is to say acknowledged by the broker or, if its
delivery failed, handled by its delivery callback. The callback runs before its record
counts as settled, so a replacement it sends for the same offset (a dead letter for a result
that could not be delivered) must settle too before the offset is finished. The records of
an offset are sent inside one `Outbox.sending` block, which holds the offset open until it
ends: an acknowledgement that arrives before the block's last send cannot finish it early.
A block that raises leaves its offset unfinished: it is never stored, and the partition's
next owner reads the record again.

The poll loop takes the finished offsets (`finished`) and stores them in partition order
(`imagegen.consumers.offsets`). Any thread may send; the delivery thread serves the reports
from `start` until `close`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, Message, Producer

from imagegen.consumers.jobs import Polled
from imagegen.consumers.threads import vital_thread
from imagegen.infra.metrics import RECORDS_PRODUCED

#: Called with the delivery's error, or None once the broker has acknowledged the record.
OnDelivered = Callable[[KafkaError | None], None]


class Sends:
    """The records produced for one offset, and how many of them are not settled yet; a
    context manager that holds the offset open while its block runs (see `Outbox.sending`).
    """

    def __init__(
        self, producer: Producer, finished: queue.SimpleQueue[Polled], polled: Polled
    ) -> None:
        self.polled = polled
        self._producer = producer
        self._finished = finished
        self._unsettled = 1  # the block's own hold, until the block ends
        self._lock = threading.Lock()  # sends and delivery reports come from several threads

    def __enter__(self) -> Sends:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        if error_type is None:  # after an exception, the offset must stay unfinished
            self._settle()

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        on_delivered: OnDelivered | None = None,
    ) -> None:
        """Produce a record for the offset; `on_delivered` runs on its delivery report.

        Only a delivery callback of this offset, or its `sending` block, may send: anything
        later would come after the offset is finished (and perhaps committed)."""
        with self._lock:
            if self._unsettled == 0:
                raise RuntimeError(f"{self.polled} is finished: nothing more may be sent for it")
            self._unsettled += 1
        produced = RECORDS_PRODUCED.labels(topic)

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                produced.inc()
            if on_delivered is not None:
                on_delivered(error)
            self._settle()

        # A produce that raises (other than for a full queue) never settles: the offset stays
        # unfinished, as the module docstring says.
        record_headers: list[tuple[str, str | bytes | None]] | None = list(headers) or None
        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, headers=record_headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                time.sleep(0.01)  # the local queue is full; the delivery thread drains it

    def _settle(self) -> None:
        with self._lock:
            self._unsettled -= 1
            finished = self._unsettled == 0
        if finished:
            self._finished.put(self.polled)


class Outbox:
    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._finished: queue.SimpleQueue[Polled] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._delivery: threading.Thread | None = None

    def start(self, on_crash: Callable[[], None]) -> None:
        """Start the delivery thread; `on_crash` runs in it should it ever crash."""
        self._delivery = vital_thread("delivery", self._deliver_until_closed, on_crash)
        self._delivery.start()

    def sending(self, polled: Polled) -> Sends:
        """`with outbox.sending(polled) as sends:` send the records of `polled` in the block;
        it is finished once the block has ended and they have all settled."""
        return Sends(self._producer, self._finished, polled)

    def finished(self) -> list[Polled]:
        """The offsets finished since the last call, in the order they finished."""
        offsets: list[Polled] = []
        while True:
            try:
                offsets.append(self._finished.get_nowait())
            except queue.Empty:
                return offsets

    def close(self) -> None:
        """Wait (up to 30 s) for the reports of everything sent, then stop the delivery thread."""
        self._producer.flush(30)
        self._closed.set()
        if self._delivery is not None:
            self._delivery.join()

    def _deliver_until_closed(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)
