"""Publish generation requests, idempotently, and wait until the broker has them.

`RequestPublisher` blocks; `AsyncRequestPublisher` is the same for asyncio. Both validate the
request locally first, so a malformed request never reaches Kafka, and both return only once
the broker acknowledged the record (acks=all), raising a typed error otherwise:

- `InvalidMessage`: the request breaks the contract (the message names the fields);
- `BrokerUnavailable`: no acknowledgement within the delivery timeout;
- `PublishError`: the broker refused the record.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from infra.errors import BrokerUnavailable, PublishError
from infra.kafka import make_producer
from infra.settings import Settings
from infra.topics import REQUESTS
from schemas import GenerationRequest, encode

DEFAULT_DELIVERY_TIMEOUT_S = 10.0

DeliveryCallback = Callable[[KafkaError | None, Message], None]


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

    def _produce(self, request: GenerationRequest, on_delivery: DeliveryCallback) -> None:
        try:
            self._producer.produce(
                REQUESTS, key=request.kafka_key, value=encode(request), on_delivery=on_delivery
            )
        except (KafkaException, BufferError) as exc:
            raise PublishError(f"the producer refused the request: {exc}") from exc

    def _error(self, error: KafkaError) -> Exception:
        if error.code() == KafkaError._MSG_TIMED_OUT or error.retriable():
            return BrokerUnavailable(
                f"the request was not acknowledged by Kafka at {self.settings.kafka_bootstrap} "
                f"within {self.delivery_timeout_s:g}s ({error.str()}). Check that the broker "
                "is up (`imagegen stack status`) and IMAGEGEN_KAFKA_BOOTSTRAP points at it."
            )
        return PublishError(f"Kafka refused the request: {error.str()}")

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

    def publish(self, request: GenerationRequest | None = None, **fields: Any) -> str:
        """Publish `request` (or one built from `fields`) and return its request id."""
        request = self._request(request, fields)
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            outcome.append(error)
            done.set()

        self._produce(request, on_delivery)
        # Whichever thread polls runs the callbacks; poll until ours has run. librdkafka
        # reports every record by message.timeout.ms, so this loop ends.
        while not done.is_set():
            self._producer.poll(0.1)
        if outcome[0] is not None:
            raise self._error(outcome[0])
        return request.request_id

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

    async def publish(self, request: GenerationRequest | None = None, **fields: Any) -> str:
        """Publish `request` (or one built from `fields`) and return its request id."""
        request = self._request(request, fields)
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()

        def settle(error: KafkaError | None) -> None:
            if delivered.done():  # the awaiting task was cancelled
                return
            if error is None:
                delivered.set_result(None)
            else:
                delivered.set_exception(self._error(error))

        self._produce(request, lambda error, _msg: loop.call_soon_threadsafe(settle, error))
        await delivered
        return request.request_id

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
