"""Every cancellation on `imagegen.cancellations`, in memory, kept current by a thread.

The processor asks it before admitting a request, and the worker before and while rendering
one. `start` returns once the book holds everything the topic held when it was called, so
a cancellation published before a process started is honoured by it. After that, a new
cancellation reaches the book within about one fetch wait (`IMAGEGEN_KAFKA_FETCH_WAIT_MS`).

The topic is compacted by request_id, and retention deletes what no running request can
need, so the book holds about a week of cancellations: a few hundred bytes each.

A cancellation counts only when its `user_id` is the request's own (`honoured`); any
other is ignored, and counted once per request in `imagegen_cancellations_ignored_total`.
Records that are not a `CancelRequest` are skipped with a warning: a bad record never stops
a reader.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from imagegen.infra.kafka import make_consumer, record_position
from imagegen.infra.metrics import CANCELS_IGNORED
from imagegen.infra.settings import Settings
from imagegen.schemas import CancelRequest, GenerationRequest, decode
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage
from imagegen.schemas.topics import CANCELLATIONS

log = logging.getLogger(__name__)


class CancelBook:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cancels: dict[str, CancelRequest] = {}
        self._ignored: set[str] = set()  # request ids whose foreign cancellation was counted
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start reading; return once every partition has been read to its end."""
        self._thread = threading.Thread(target=self._run, name="cancel-book", daemon=True)
        self._thread.start()
        if not self._caught_up.wait(timeout_s):
            self.close()
            raise BrokerUnavailable(
                f"could not read {CANCELLATIONS} to its end within {timeout_s:g}s"
                + (f" ({self._failure})" if self._failure else "")
                + f"; is the broker at {self._settings.kafka_bootstrap} healthy?"
            )
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def honoured(self, request: GenerationRequest) -> CancelRequest | None:
        """The request's cancellation, if it has one from its own user."""
        with self._lock:
            cancel = self._cancels.get(request.request_id)
            if cancel is None or cancel.user_id == request.user_id:
                return cancel
            if request.request_id not in self._ignored:
                self._ignored.add(request.request_id)
                CANCELS_IGNORED.inc()
                log.warning(
                    "ignoring a cancellation of %s from user %r: the request is %r's",
                    request.request_id,
                    cancel.user_id,
                    request.user_id,
                    extra={"request_id": request.request_id},
                )
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._cancels)

    # ---- the reading thread ---------------------------------------------------------------

    def _run(self) -> None:
        consumer = make_consumer(
            self._settings,
            group_id="imagegen-cancel-book",  # never joined nor committed: assigned partitions
            **{"enable.auto.commit": False, "enable.partition.eof": True},
        )
        try:
            metadata = consumer.list_topics(CANCELLATIONS, timeout=10).topics[CANCELLATIONS]
            unread = set(metadata.partitions)
            consumer.assign(
                [TopicPartition(CANCELLATIONS, p, OFFSET_BEGINNING) for p in sorted(unread)]
            )
            while not self._stopping.is_set():
                for message in consumer.consume(500, timeout=0.1):
                    self._read(message, unread)
                if not unread:
                    self._caught_up.set()
        except Exception as exc:  # the start-up wait reports it; later, the log does
            self._failure = exc
            log.exception("the cancellation book stopped reading %s", CANCELLATIONS)
        finally:
            consumer.close()

    def _read(self, message: Message, unread: set[int]) -> None:
        error = message.error()
        if error is not None:
            # A fetch's end of partition is the true end (ListOffsets may say less).
            if error.code() == KafkaError._PARTITION_EOF:
                unread.discard(record_position(message)[1])
            else:
                log.warning("reading %s: %s", CANCELLATIONS, error)
            return
        value = message.value()
        key = message.key()
        if value is None:  # a tombstone: compaction's way to forget the key
            with self._lock:
                self._cancels.pop((key or b"").decode(errors="replace"), None)
            return
        try:
            cancel = decode(CancelRequest, value)
        except InvalidMessage as exc:
            log.warning(
                "skipping %s[%s]@%s: %s",
                CANCELLATIONS,
                message.partition(),
                message.offset(),
                exc,
            )
            return
        with self._lock:
            self._cancels[cancel.request_id] = cancel
