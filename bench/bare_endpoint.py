"""The gateway benchmark's baseline: a bare FastAPI endpoint that publishes and answers.

`POST /v1/images/generations` builds the same `GenerationRequest` from the body as the
gateway does (`gateway.submissions.parse_body`, as the fixed user `BARE_USER`), produces it
to `imagegen.requests` with the project's producer (`infra.kafka.make_producer`: idempotent,
acks=all), waits for the broker's acknowledgement and answers 202 with the request id.
Nothing else: no API key, no wait for the intake's decision, no job store. `GET /readyz`
answers 200 once the app runs.

Run: `python -m bench.bare_endpoint`, with IMAGEGEN_GATEWAY_HOST and IMAGEGEN_GATEWAY_PORT
saying where it listens and the other IMAGEGEN_* settings where the broker is.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from confluent_kafka import KafkaError, Message, Producer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from imagegen.gateway.submissions import parse_body
from imagegen.infra.kafka import make_producer
from imagegen.infra.settings import Settings, load_settings
from imagegen.schemas import encode
from imagegen.schemas.topics import REQUESTS

BARE_USER = "bench-bare"
#: As the gateway's publisher: librdkafka reports a record it gave up on after this.
DELIVERY_TIMEOUT_MS = 10_000


class Publisher:
    """One producer, polled by a background thread that settles each send's future on the
    event loop that awaits it (as `AsyncRequestPublisher` does, without its tracing)."""

    def __init__(self, settings: Settings) -> None:
        self._producer: Producer = make_producer(
            settings, **{"message.timeout.ms": DELIVERY_TIMEOUT_MS}
        )
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="bare-publisher", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.05)

    async def send(self, key: bytes, value: bytes) -> None:
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()

        def settle(error: KafkaError | None) -> None:
            if delivered.done():
                return
            if error is None:
                delivered.set_result(None)
            else:
                delivered.set_exception(RuntimeError(f"delivery failed: {error.str()}"))

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            loop.call_soon_threadsafe(settle, error)

        self._producer.produce(REQUESTS, key=key, value=value, on_delivery=on_delivery)
        await delivered

    def close(self) -> None:
        self._stopping.set()
        self._poller.join()
        self._producer.flush(DELIVERY_TIMEOUT_MS / 1000)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.publisher = Publisher(settings)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.publisher.close)

    app = FastAPI(title="bare endpoint", lifespan=lifespan)

    @app.post("/v1/images/generations", status_code=202)
    async def create_generation(request: Request) -> Response:
        submission = parse_body(await request.body(), BARE_USER, None, settings.default_ttl_s)
        generation = submission.request
        publisher: Publisher = request.app.state.publisher
        await publisher.send(generation.kafka_key, encode(generation))
        return JSONResponse({"id": generation.request_id}, 202)

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> str:
        return "ready"

    return app


def main() -> None:
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        access_log=False,
        log_level="warning",
        server_header=False,
    )


if __name__ == "__main__":
    main()
