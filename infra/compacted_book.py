"""A compacted topic held in memory and kept current by a thread: the reading under the API
key book (`infra.key_book`), as `infra.cancel_book` reads its topic, in a form a book of any
model can reuse.

`start` returns once the book holds everything the topic held when it was called, so a
record published before a process started is known to it; after that, a new record reaches
the book within about one fetch wait (`IMAGEGEN_KAFKA_FETCH_WAIT_MS`). The thread reads every
partition with `assign()` from the beginning, never in a group, and commits nothing.

Records that are not the book's model are skipped with a warning (a bad record never stops a
reader); a tombstone (no value) makes the book forget its key, as compaction will.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Generic, Self, TypeVar

from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition
from pydantic import BaseModel

from imagegen.infra.kafka import make_consumer, record_position
from imagegen.infra.settings import Settings
from imagegen.schemas import decode
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage

log = logging.getLogger(__name__)
Model = TypeVar("Model", bound=BaseModel)


class CompactedBook(ABC, Generic[Model]):
    """Subclasses keep what `_keep` and `_forget` are handed, both called with `_lock` held;
    their queries take `_lock` too."""

    def __init__(
        self, settings: Settings, topic: str, model: type[Model], group_id: str, what: str
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._model = model
        self._group_id = group_id  # never joined nor committed: assigned partitions
        self._what = what  # "the key book", for thread names and messages
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._settled = threading.Event()  # caught up, or the thread failed
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start reading; return once every partition has been read to its end."""
        self._thread = threading.Thread(
            target=self._run, name=self._what.removeprefix("the ").replace(" ", "-"), daemon=True
        )
        self._thread.start()
        if not self._settled.wait(timeout_s) or self._failure is not None:
            self.close()
            raise BrokerUnavailable(
                f"{self._what} could not read {self._topic} to its end"
                + (f" ({self._failure})" if self._failure else f" within {timeout_s:g}s")
                + f"; is the broker at {self._settings.kafka_bootstrap} healthy, and the topic "
                "created (`imagegen init`)?"
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

    def caught_up(self) -> bool:
        """Whether the book read the topic to its end and is still following it."""
        return self._caught_up.is_set() and self._failure is None and not self._stopping.is_set()

    @abstractmethod
    def _keep(self, key: str, record: Model) -> None:
        """Take in `record`, read under the Kafka key `key`."""

    @abstractmethod
    def _forget(self, key: str) -> None:
        """Drop what the book holds under `key` (a tombstone)."""

    # ---- the reading thread ---------------------------------------------------------------

    def _run(self) -> None:
        consumer = make_consumer(
            self._settings,
            group_id=self._group_id,
            **{"enable.auto.commit": False, "enable.partition.eof": True},
        )
        try:
            metadata = consumer.list_topics(self._topic, timeout=10).topics[self._topic]
            if metadata.error is not None:
                raise BrokerUnavailable(f"{self._topic}: {metadata.error.str()}")
            unread = set(metadata.partitions)
            consumer.assign(
                [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in sorted(unread)]
            )
            while not self._stopping.is_set():
                for message in consumer.consume(500, timeout=0.1):
                    self._read(message, unread)
                if not unread:
                    self._caught_up.set()
                    self._settled.set()
        except Exception as exc:  # the start-up wait reports it; later, the log does
            self._failure = exc
            self._settled.set()
            log.exception("%s stopped reading %s", self._what, self._topic)
        finally:
            consumer.close()

    def _read(self, message: Message, unread: set[int]) -> None:
        error = message.error()
        if error is not None:
            # A fetch's end of partition is the true end (ListOffsets may say less).
            if error.code() == KafkaError._PARTITION_EOF:
                unread.discard(record_position(message)[1])
            else:
                log.warning("reading %s: %s", self._topic, error)
            return
        value = message.value()
        key = (message.key() or b"").decode(errors="replace")
        if value is None:  # a tombstone: compaction's way to forget the key
            with self._lock:
                self._forget(key)
            return
        try:
            record = decode(self._model, value)
        except InvalidMessage as exc:
            log.warning(
                "skipping %s[%s]@%s: %s", self._topic, message.partition(), message.offset(), exc
            )
            return
        with self._lock:
            self._keep(key, record)
