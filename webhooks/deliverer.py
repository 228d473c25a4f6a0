"""`imagegen webhooks`: deliver the webhooks of `imagegen.events`, in the consumer group
`imagegen-webhooks`, retrying failures from `imagegen.webhooks.retry.N`.

One thread polls; attempts run in a pool (IMAGEGEN_WEBHOOK_CONCURRENCY), so a slow or dead
receiver holds a pool thread for at most the connect and read timeouts, and never the
partition: the records behind it are attempted meanwhile. A user with
IMAGEGEN_WEBHOOK_CONCURRENCY_PER_USER attempts in flight has the next one deferred to the
first retry topic, so no user's endpoints take the pool from the others.

After an attempt, exactly one of: delivered; written to the retry topic of its next delay
(`webhooks.schedule`, read back when due: `webhooks.waiting`); dead-lettered with stage
`webhook`, once the budget (IMAGEGEN_WEBHOOK_RETRY_S) is spent or the URL is refused. The
dead letter's original is the delivery on the first retry topic, so `imagegen dlq replay`
sends it there and it is attempted at once, with a new budget.

Commit order: a record's offset is stored for commit only once its attempt has ended and
what came of it is acknowledged by the broker (the retry record, or the dead letter).
Offsets are committed in order, past the oldest record still in flight. A crash therefore
attempts again what was in flight, under the same `webhook-id`: delivery is at least once.
A produce that fails is logged and produced again; the offset waits for it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Self

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from imagegen.consumers.offsets import OffsetTracker
from imagegen.infra.dead_letter_spill import fits, spill
from imagegen.infra.health import DEFAULT_STALL_S, Health
from imagegen.infra.kafka import (
    consume_available,
    consumed_headers,
    make_consumer,
    make_producer,
)
from imagegen.infra.metrics import (
    DLQ_RECORDS,
    RECORDS_PRODUCED,
    WEBHOOK_DELIVERIES,
    WEBHOOK_SECONDS,
)
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.schemas import DeadLetter, Stage, encode
from imagegen.schemas.errors import ImagegenError, InvalidMessage
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import DLQ, EVENTS, WEBHOOK_GROUP, WEBHOOK_RETRIES
from imagegen.schemas.webhook_deliveries import WebhookDelivery
from imagegen.webhooks.attempts import Attempted, Attempts
from imagegen.webhooks.records import StartTimes, delivery_of_event, delivery_of_retry
from imagegen.webhooks.schedule import Retry, deferred, next_retry
from imagegen.webhooks.waiting import DueGate, Where

log = logging.getLogger(__name__)

_BATCH = 500
#: The longest poll: how soon a stop, a finished attempt or a due retry is acted on.
_POLL_S = 0.1
_FLUSH_S = 30.0


class WebhookUndeliverable(ImagegenError):
    """A webhook that was not delivered: its dead letter's error."""


@dataclass(frozen=True)
class _Taken:
    """A consumed record that is a delivery, and where it was read."""

    where: Where
    offset: int
    message: Message
    delivery: WebhookDelivery


class WebhookDeliverer:
    def __init__(
        self,
        settings: Settings,
        attempts: Attempts,
        store: ObjectStore,
        health: Health | None = None,
    ) -> None:
        """`health` is what the metrics port serves: the polling loop beats on it, and the
        first assignment meets its group condition."""
        self._settings = settings
        self._health = health or Health()
        # The loop waits for a free slot at most as long as one attempt may take.
        self._stall_s = (
            settings.webhook_connect_timeout_s + settings.webhook_read_timeout_s + DEFAULT_STALL_S
        )
        self._attempts = attempts
        self._store = store  # where dead letters too big for the DLQ spill
        self._consumer: Consumer = make_consumer(settings, WEBHOOK_GROUP)
        self._producer: Producer = make_producer(settings)
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, "webhook")
        self._gate = DueGate(self._consumer)
        self._starts = StartTimes()
        # Owned by the polling thread; the pool hands finished attempts back through _ended.
        self._offsets = {topic: OffsetTracker() for topic in (EVENTS, *WEBHOOK_RETRIES)}
        self._per_user: Counter[str] = Counter()
        self._in_flight = 0
        self._ended: queue.SimpleQueue[tuple[_Taken, Attempted]] = queue.SimpleQueue()
        self._stopping = threading.Event()

    def run(self) -> None:
        """Deliver until `stop`; then finish what is in flight and commit."""
        self._consumer.subscribe(
            [EVENTS, *WEBHOOK_RETRIES], on_assign=self._assigned, on_revoke=self._revoked
        )
        try:
            while not self._stopping.is_set():
                self._health.liveness.beat("delivery loop", self._stall_s)
                self._step()
            self._pool.shutdown(wait=True)
            self._settle_ended()
            if self._producer.flush(_FLUSH_S):
                log.error(
                    "stopped with webhook records unwritten: their events are delivered again "
                    "from the last commit by the next deliverer"
                )
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stopping.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _step(self) -> None:
        self._gate.release_due()
        self._settle_ended()
        self._producer.poll(0)
        for message in consume_available(self._consumer, _BATCH, self._gate.next_due_in_s(_POLL_S)):
            self._take(message)

    # ---- taking records ---------------------------------------------------------------

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("the webhook consumer reports: %s", error)
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        where = (topic, partition)
        if self._gate.holds(where):
            return  # polled before its partition paused: it is read again when due
        now = utc_now()
        if topic == EVENTS:
            delivery = delivery_of_event(message, self._starts, now)
        else:
            try:
                delivery = delivery_of_retry(message, self._settings, now)
            except InvalidMessage as exc:
                self._offsets[topic].started(partition, offset)
                self._dead_letter(where, offset, message, None, f"not a webhook delivery: {exc}")
                return
            due_in_s = (delivery.not_before - now).total_seconds()
            if due_in_s > 0:
                self._gate.wait(where, offset, due_in_s)
                return
        self._offsets[topic].started(partition, offset)
        if delivery is None:
            self._finished(where, offset)
            return
        self._dispatch(_Taken(where, offset, message, delivery), now)

    def _dispatch(self, taken: _Taken, now: datetime) -> None:
        user = taken.delivery.user_id
        if self._per_user[user] >= self._settings.webhook_concurrency_per_user:
            WEBHOOK_DELIVERIES.labels("deferred").inc()
            self._retry(taken, taken.delivery, deferred(self._settings, now))
            return
        while self._in_flight >= self._settings.webhook_concurrency:
            self._settle(*self._ended.get())  # the pool is full: wait for an attempt to end
        self._per_user[user] += 1
        self._in_flight += 1
        future = self._pool.submit(self._attempt, taken.delivery)
        future.add_done_callback(lambda done: self._ended.put((taken, done.result())))

    def _attempt(self, delivery: WebhookDelivery) -> Attempted:
        with WEBHOOK_SECONDS.time():
            try:
                return self._attempts.attempt(delivery)
            except Exception as exc:  # a bug or the object store: retried, never lost
                log.exception("a webhook attempt failed unexpectedly")
                return Attempted(False, error=f"{type(exc).__name__}: {exc}")

    # ---- after an attempt -------------------------------------------------------------

    def _settle_ended(self) -> None:
        while True:
            try:
                ended = self._ended.get_nowait()
            except queue.Empty:
                return
            self._settle(*ended)

    def _settle(self, taken: _Taken, attempted: Attempted) -> None:
        delivery = taken.delivery
        self._in_flight -= 1
        self._per_user[delivery.user_id] -= 1
        if self._per_user[delivery.user_id] <= 0:
            del self._per_user[delivery.user_id]
        if attempted.delivered:
            WEBHOOK_DELIVERIES.labels("delivered").inc()
            self._finished(taken.where, taken.offset)
            return
        now = utc_now()
        failed = delivery.model_copy(
            update={"attempts": delivery.attempts + 1, "last_error": _short(attempted.error)}
        )
        retry = None
        if not attempted.permanent:
            retry = next_retry(self._settings, failed.attempts, failed.first_attempt_at, now)
        if retry is None:
            why = _why(failed, attempted.error)
            self._dead_letter(taken.where, taken.offset, taken.message, failed, why)
        else:
            WEBHOOK_DELIVERIES.labels("retried").inc()
            self._retry(taken, failed, retry)

    def _retry(self, taken: _Taken, delivery: WebhookDelivery, retry: Retry) -> None:
        waiting = delivery.model_copy(update={"not_before": retry.not_before})
        self._produce(
            retry.topic, waiting.kafka_key, encode(waiting), None, taken.where, taken.offset
        )

    def _dead_letter(
        self,
        where: Where,
        offset: int,
        message: Message,
        delivery: WebhookDelivery | None,
        why: str,
    ) -> None:
        """`delivery` is what to replay; None for a record that is not one (kept as read)."""
        letter = DeadLetter.from_failure(
            error=WebhookUndeliverable(why),
            stage=Stage.WEBHOOK,
            # Replayed to the first retry topic, where it is attempted at once.
            topic=WEBHOOK_RETRIES[0],
            partition=where[1],
            offset=offset,
            timestamp_ms=message.timestamp()[1],
            key=message.key() if delivery is None else delivery.kafka_key,
            value=message.value() if delivery is None else encode(delivery),
            headers=consumed_headers(message),
            attempts=0 if delivery is None else delivery.attempts,
            group=WEBHOOK_GROUP,
        )
        if not fits(letter):
            letter = spill(letter, self._store)
        log.error("webhook dead-lettered: %s", why)
        WEBHOOK_DELIVERIES.labels("dead_lettered").inc()
        self._produce(DLQ, letter.key, letter.value, letter.headers(), where, offset)

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        where: Where,
        offset: int,
    ) -> None:
        def acknowledged(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                log.error(
                    "could not write a webhook record to %s (%s); writing it again", topic, error
                )
                self._produce(topic, key, value, headers, where, offset)
                return
            RECORDS_PRODUCED.labels(topic).inc()
            if topic == DLQ:
                DLQ_RECORDS.labels(Stage.WEBHOOK.value).inc()
            self._finished(where, offset)

        self._producer.produce(
            topic, value, key, headers=list(headers or []), on_delivery=acknowledged
        )

    def _finished(self, where: Where, offset: int) -> None:
        topic, partition = where
        committable = self._offsets[topic].finished(partition, offset)
        if committable is None:
            return
        try:
            self._consumer.store_offsets(offsets=[TopicPartition(topic, partition, committable)])
        except KafkaException as exc:  # revoked meanwhile: its new owner reads it again
            log.debug("offset of %s/%d not stored: %s", topic, partition, exc)

    # ---- rebalances -------------------------------------------------------------------

    def _assigned(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._health.readiness.joined(WEBHOOK_GROUP)

    def _revoked(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        self._gate.forget(revoked)
        for topic, tracker in self._offsets.items():
            tracker.forget([partition for t, partition in revoked if t == topic])


def _why(delivery: WebhookDelivery, error: str | None) -> str:
    return (
        f"webhook {delivery.webhook_id} ({delivery.kind}) of job {delivery.event.request_id} "
        f"not delivered after {delivery.attempts} attempt(s) since "
        f"{delivery.first_attempt_at.isoformat()}: {error}. Fix the receiver, then "
        "`imagegen dlq replay --stage webhook` sends it again"
    )


def _short(error: str | None) -> str | None:
    return None if error is None else error[:1000]
