"""Publish generation requests and their cancellations, idempotently, and wait until the
broker has them.

`RequestPublisher` blocks; `AsyncRequestPublisher` is the same for asyncio. `publish` sends a
request to `imagegen.requests`, keyed by user; `cancel` sends a `CancelRequest` to the
compacted `imagegen.cancellations`, keyed by request id. Both validate the record locally
first, so a malformed one never reaches Kafka, and both return only once the broker
acknowledged it (acks=all), raising a typed error otherwise:

- `InvalidMessage`: the record breaks the contract (the message names the fields);
- `BrokerUnavailable`: no acknowledgement within the delivery timeout;
- `PublishError`: the broker refused the record.

Each send is traced (`imagegen.infra.tracing`): the record carries a W3C `traceparent` header
naming an `imagegen.publish` (or `imagegen.cancel`) span, the child of the caller's current
OpenTelemetry span or of the `traceparent` the caller passes. Without OpenTelemetry, a passed
`traceparent` goes on the record unchanged, and without one the record has no trace header.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from imagegen.infra.kafka import ProduceHeaders, make_producer
from imagegen.infra.metrics import RECORDS_PRODUCED
from imagegen.infra.settings import Settings
from imagegen.infra.tracing import is_traceparent, start_span
from imagegen.schemas import CancelRequest, GenerationRequest, encode
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage, PublishError
from imagegen.schemas.headers import TRACEPARENT
from imagegen.schemas.topics import CANCELLATIONS, REQUESTS

DEFAULT_DELIVERY_TIMEOUT_S = 10.0

#: What it returns is ignored.
DeliveryCallback = Callable[[KafkaError | None, Message], object]
#: What a publisher sends: a request, or a request's cancellation.
Record = GenerationRequest | CancelRequest


def _destination(record: Record) -> tuple[str, str]:
    """The topic `record` goes to, and the span that traces its send."""
    if isinstance(record, CancelRequest):
        return CANCELLATIONS, "imagegen.cancel"
    return REQUESTS, "imagegen.publish"


def _noun(record: Record) -> str:
    return "cancellation" if isinstance(record, CancelRequest) else "request"


class _Publisher:
    """What both forms share: one idempotent producer and the error translation."""

    def __init__(self, settings: Settings, delivery_timeout_s: float) -> None:
        self.settings = settings
        self.delivery_timeout_s = delivery_timeout_s
        # librdkafka gives up on a record after message.timeout.ms and reports it, so a dead
        # broker surfaces as an error after the timeout instead of an endless wait.
        self._producer: Producer = make_producer(
            settings, **{"message.timeout.ms": int(delivery_timeout_s * 1000)}
        )

    def _produce(
        self, record: Record, traceparent: str | None, on_delivery: DeliveryCallback
    ) -> None:
        if traceparent is not None and not is_traceparent(traceparent):
            raise InvalidMessage(
                f"traceparent {traceparent!r} is not a W3C trace context "
                "(00-<32 hex trace id>-<16 hex span id>-<2 hex flags>)",
                [("traceparent", "not a W3C traceparent")],
            )
        topic, span_name = _destination(record)
        span = start_span(
            span_name,
            None if traceparent is None else [(TRACEPARENT, traceparent)],
            kind="producer",
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic,
                "imagegen.request_id": record.request_id,
                "imagegen.user_id": record.user_id,
            },
        )

        def delivered(error: KafkaError | None, message: Message) -> None:
            if error is None:
                RECORDS_PRODUCED.labels(topic).inc()
            span.end(None if error is None else KafkaException(error))
            on_delivery(error, message)

        headers: ProduceHeaders = [*span.headers]
        try:
            self._producer.produce(
                topic,
                key=record.kafka_key,
                value=encode(record),
                headers=headers or None,
                on_delivery=delivered,
            )
        except (KafkaException, BufferError) as exc:
            span.end(exc)
            raise PublishError(f"the producer refused the {_noun(record)}: {exc}") from exc

    def _error(self, error: KafkaError, record: Record) -> Exception:
        if error.code() == KafkaError._MSG_TIMED_OUT or error.retriable():
            return BrokerUnavailable(
                f"the {_noun(record)} was not acknowledged by Kafka at "
                f"{self.settings.kafka_bootstrap} within {self.delivery_timeout_s:g}s "
                f"({error.str()}). Check that the broker is up (`imagegen stack status`) "
                "and IMAGEGEN_KAFKA_BOOTSTRAP points at it."
            )
        return PublishError(f"Kafka refused the {_noun(record)}: {error.str()}")

    @staticmethod
    def _request(request: GenerationRequest | None, fields: dict[str, Any]) -> GenerationRequest:
        if request is not None and fields:
            raise TypeError("pass either a GenerationRequest or its fields, not both")
        return request if request is not None else GenerationRequest.new(**fields)


class RequestPublisher(_Publisher):
    """Blocking publisher. Safe to share between threads."""

    def __init__(
        self, settings: Settings, delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S
    ) -> None:
        super().__init__(settings, delivery_timeout_s)

    def publish(
        self,
        request: GenerationRequest | None = None,
        *,
        traceparent: str | None = None,
        **fields: Any,
    ) -> str:
        """Publish `request` (or one built from `fields`) and return its request id.

        `traceparent` (W3C) continues that trace instead of the caller's current one.
        """
        request = self._request(request, fields)
        self._send(request, traceparent)
        return request.request_id

    def cancel(
        self, request_id: str, user_id: str, *, traceparent: str | None = None
    ) -> CancelRequest:
        """Ask that `request_id` stop, as `user_id` (only its owner's wish is honoured), and
        return the `CancelRequest` sent. If it lands in time, the result says `canceled`."""
        cancellation = CancelRequest.new(request_id=request_id, user_id=user_id)
        self._send(cancellation, traceparent)
        return cancellation

    def _send(self, record: Record, traceparent: str | None) -> None:
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            outcome.append(error)
            done.set()

        self._produce(record, traceparent, on_delivery)
        # Whichever thread polls runs the callbacks; poll until ours has run. librdkafka
        # reports every record by message.timeout.ms, so this loop ends.
        while not done.is_set():
            self._producer.poll(0.1)
        if outcome[0] is not None:
            raise self._error(outcome[0], record)

    def close(self) -> None:
        self._producer.flush(self.delivery_timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncRequestPublisher(_Publisher):
    """asyncio publisher: many publishes may be in flight at once on one producer.

    A background thread polls the producer and hands each delivery report back to the event
    loop that awaits it.
    """

    def __init__(
        self, settings: Settings, delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S
    ) -> None:
        super().__init__(settings, delivery_timeout_s)
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="imagegen-publisher", daemon=True)
        self._poller.start()

    async def publish(
        self,
        request: GenerationRequest | None = None,
        *,
        traceparent: str | None = None,
        **fields: Any,
    ) -> str:
        """Publish `request` (or one built from `fields`) and return its request id.

        `traceparent` (W3C) continues that trace instead of the caller's current one.
        """
        request = self._request(request, fields)
        await self._send(request, traceparent)
        return request.request_id

    async def cancel(
        self, request_id: str, user_id: str, *, traceparent: str | None = None
    ) -> CancelRequest:
        """`RequestPublisher.cancel`, awaited."""
        cancellation = CancelRequest.new(request_id=request_id, user_id=user_id)
        await self._send(cancellation, traceparent)
        return cancellation

    async def _send(self, record: Record, traceparent: str | None) -> None:
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()

        def settle(error: KafkaError | None) -> None:
            if delivered.done():  # the awaiting task was cancelled
                return
            if error is None:
                delivered.set_result(None)
            else:
                delivered.set_exception(self._error(error, record))

        self._produce(
            record, traceparent, lambda error, _msg: loop.call_soon_threadsafe(settle, error)
        )
        await delivered

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.1)

    async def close(self) -> None:
        await asyncio.to_thread(self._producer.flush, self.delivery_timeout_s)
        self._stopping.set()
        await asyncio.to_thread(self._poller.join)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
