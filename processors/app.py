"""The intake processor: a faust app that reads `imagegen.requests` and, for each record,
admits it to a render queue (`imagegen.render` for `interactive` requests,
`imagegen.render.batch` for `batch` ones), answers it on `imagegen.results` (rejected,
duplicate, canceled, expired), drops it as a publish retry, or dead-letters it to
`imagegen.dlq`. Each admission and each answer is also told on `imagegen.events`
(`admitted`, `finished`), best-effort (`imagegen.processors.job_events`).

Before it consumes, the processor reads every cancellation (`CancelBook`), so a request
canceled before it was admitted is answered `canceled`; and it starts watching the fleet's
load (`FleetWatch` feeding `FleetLoad`), so a request that cannot start before its deadline
is answered `rejected`/`overloaded` at once instead of queueing to expire.

Guarantees, and where they are enforced:
- Nothing is skipped. No exception ever leaves the agent's loop (faust would ack the record
  and commit past it, faust-streaming issue 315): `_start` turns every failure into a dead
  letter. If even the dead letter or the state cannot be written, the process exits at
  once, before the batch is acked, and the restarted processor reads it again.
- Nothing is lost on the way out. The records of a batch are acked only once every send
  made for the batch (render, results, DLQ, changelogs) is acknowledged by the broker;
  faust commits only acked offsets.
- State survives crashes. Dedupe memory and token buckets are faust tables backed by
  changelog topics, rebuilt on start-up by reading each changelog to its end.
- Events never decide a request's fate. They are not among a batch's sends: a failed event
  is counted in `imagegen_events_unsent_total` and logged, and the request goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faust
from faust.streams import Stream
from faust.types import EventT, StreamT

from imagegen.infra.cancel_book import CancelBook
from imagegen.infra.dead_letter_spill import fits, spill
from imagegen.infra.health import Health, probe_broker_and_store
from imagegen.infra.kafka import check_broker, make_admin
from imagegen.infra.logs import logging_config
from imagegen.infra.metrics import (
    DLQ_RECORDS,
    INTAKE_REQUESTS,
    JOBS_ENDED_EARLY,
    RECORDS_CONSUMED,
    RECORDS_PRODUCED,
    LagMonitor,
    serve,
)
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.infra.topics import ensure_topics
from imagegen.infra.tracing import Span, start_span, trace_headers
from imagegen.processors import job_events
from imagegen.processors.faust_app import App
from imagegen.processors.fleet_watch import FleetWatch
from imagegen.processors.intake import Admit, Answer, Drop, Intake, Invalid, Outcome, StageFailed
from imagegen.processors.load import FleetLoad
from imagegen.processors.state import WriteBehind
from imagegen.processors.trust import screen
from imagegen.schemas import DeadLetter, GenerationRequest, GenerationResult, Stage, Status, encode
from imagegen.schemas.headers import ADMITTED_AT_HEADER, TRACEPARENT, TRACESTATE
from imagegen.schemas.topics import (
    DLQ,
    EVENTS,
    PROCESSOR_GROUP,
    RENDER,
    RENDER_BATCH,
    REQUESTS,
    RESULTS,
)

# A batch closes at BATCH_MAX records or BATCH_WITHIN_S after its first, whichever is first:
# big enough to amortise a broker round trip, short enough to add no noticeable latency.
BATCH_MAX = 500
BATCH_WITHIN_S = 0.005
# The longest between two sweeps for expired dedupe entries and full token buckets.
SWEEP_INTERVAL_S = 60.0

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
# A record handed to the producer: its topic, and the broker's acknowledgement to await.
Sent = tuple[str, Awaitable[Any]]


@dataclass(frozen=True)
class Started:
    """A decided event: its outcome (None once dead-lettered by a failed stage), the sends
    it started, and the error that stopped one from starting."""

    event: EventT
    outcome: Outcome | None
    sends: list[Sent]
    failure: BaseException | None = None


class IntakeProcessor:
    """Owns the faust app, its topics and tables, and the handling of each record."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        check_broker(settings)
        admin = make_admin(settings)
        ensure_topics(admin, settings)
        # Tables are co-partitioned with the requests topic, and the global rate limit is
        # shared out per partition, so both need its real partition count.
        metadata = admin.list_topics(REQUESTS, timeout=10)
        self.partitions = len(metadata.topics[REQUESTS].partitions)
        # faust creates the changelogs itself and cannot ask for the cluster's default.
        replication = settings.topic_replication_factor
        if replication < 1:
            replication = min(3, len(metadata.brokers))
        self.app = _make_app(settings, self.partitions, replication)

        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.requests = self.app.topic(REQUESTS, **raw)
        # Tables serialise keys and values as JSON, so str keys come back from the changelog
        # as str (raw keys would come back as bytes and miss every lookup).
        self.state = [
            WriteBehind(self.app.Table("dedupe", partitions=self.partitions)),
            WriteBehind(self.app.Table("buckets", partitions=self.partitions)),
        ]
        dedupe_memory, buckets = self.state
        # The book and the watch start reading in `run`, before the agent consumes anything.
        self.cancellations = CancelBook(settings)
        self.load = FleetLoad()
        self.fleet = FleetWatch(settings, self.load)
        self.intake = Intake(
            settings,
            dedupe_memory,
            buckets,
            partitions=self.partitions,
            cancellation=self.cancellations.honoured,
            load=self.load,
        )
        # Expired dedupe entries and full buckets are forgotten at the first batch a tenth
        # of the dedupe window (at most SWEEP_INTERVAL_S) after the last sweep.
        self._sweep_interval_s = min(SWEEP_INTERVAL_S, settings.dedupe_window_s / 10)
        self._next_sweep = time.monotonic() + self._sweep_interval_s
        self.app.agent(self.requests, name="intake")(self._consume)
        # What the metrics port serves: the event loop beats every second; the processor is
        # ready once its first rebalance completed, its tables recovered.
        self.health = Health()
        self.health.readiness.joining(PROCESSOR_GROUP)
        self.app.timer(1.0)(self._beat)
        self.app.on_rebalance_complete.connect(self._rebalanced)

    async def _beat(self, *_: object) -> None:
        self.health.liveness.beat("event loop")

    async def _rebalanced(self, *_: object, **__: object) -> None:
        self.health.readiness.joined(PROCESSOR_GROUP)

    async def _consume(self, stream: StreamT) -> None:
        # Records are handled in batches so that their sends travel together: waiting for
        # each send's acknowledgement in turn would cost a broker round trip per record.
        # Events are acked only after every send of their batch is acknowledged.
        # Every agent gets a faust Stream, whose `noack_take` the StreamT interface lacks. It
        # yields the events, though annotated as yielding values.
        batches = cast(Stream, stream).noack_take(BATCH_MAX, within=BATCH_WITHIN_S)
        async for events in batches:
            RECORDS_CONSUMED.labels(REQUESTS).inc(len(events))
            await self._handle_batch(events)
            for event in events:
                await stream.ack(event)

    async def _handle_batch(self, events: Sequence[EventT]) -> None:
        if time.monotonic() >= self._next_sweep:
            self._sweep()
        started = []
        for event in events:
            self._deciding(event)
            started.append(await self._start(event))
        await self._flush_state()
        for record in started:
            acks = (ack for _, ack in record.sends)
            results = await asyncio.gather(*acks, return_exceptions=True)
            failed = (result for result in results if isinstance(result, BaseException))
            failure = record.failure or next(failed, None)
            if failure is not None:
                await self._unpublished(record, failure)
            for (topic, _), result in zip(record.sends, results, strict=True):
                if not isinstance(result, BaseException):
                    RECORDS_PRODUCED.labels(topic).inc()
        await self._flush_state()  # the dedupe entries that failed sends released

    def _deciding(self, event: EventT) -> None:
        """Point the state at the changelog partition of the record about to change it."""
        for store in self.state:
            store.partition = event.message.partition

    async def _flush_state(self) -> None:
        try:
            changelog = []
            for store in self.state:
                changelog += await store.flush(self.app.producer)
            await asyncio.gather(*changelog)
        except Exception:
            # Nothing of this batch is acked yet: the restarted processor decides it again.
            log.critical("cannot write the intake state; exiting", exc_info=True)
            os._exit(70)

    def _sweep(self) -> None:
        """Delete the dedupe entries past the window and the token buckets refilled to their
        burst, so that memory holds one window of requests and the users active lately,
        not every request and user ever (user ids are the publishers' to invent). Only the
        partitions this processor owns now: an entry it still holds for a partition that
        moved may have been renewed by the new owner. Runs before a batch is decided, so
        the batch's own writes win."""
        assigned = self.app.assignor.assigned_actives()
        owned = {tp.partition for tp in assigned if tp.topic == REQUESTS}
        dedupe_memory, buckets = self.state
        forgettable = (
            (dedupe_memory, self.intake.expired_dedupe(dedupe_memory.stored())),
            (buckets, self.intake.full_buckets(buckets.stored())),
        )
        for store, entries in forgettable:
            for key, partition in entries:
                if partition in owned:
                    store.delete(key, partition)
        self._next_sweep = time.monotonic() + self._sweep_interval_s

    async def _start(self, event: EventT) -> Started:
        """Decide the event's outcome and start its sends."""
        message = event.message
        trusted = screen(_headers(event), self.settings)
        try:
            outcome = self.intake.decide(
                event.value,
                message.partition,
                message.offset,
                key=event.key,
                replayed=trusted.replay_of is not None,
            )
        except StageFailed as failure:
            await self._dead_letter(event, failure.__cause__ or failure, failure.stage)
            return Started(event, None, [])
        span = _intake_span(trusted.headers, outcome)
        try:
            sends = await self._perform(outcome, event, trusted.headers, span.headers)
            return Started(event, outcome, sends)
        except Exception as exc:
            span.end(exc)
            return Started(event, outcome, [], failure=exc)
        finally:
            span.end()

    async def _perform(
        self, outcome: Outcome, event: EventT, headers: Headers, trace: Headers
    ) -> list[Sent]:
        """Start the outcome's sends; what they produce continues the request's trace.
        `headers` are the record's trusted ones: none in a reserved namespace."""
        INTAKE_REQUESTS.labels(outcome_label(outcome)).inc()
        match outcome:
            case Admit(request=request, queue=queue):
                admitted = [*_untraced(headers), *trace, (ADMITTED_AT_HEADER, _now_ms())]
                queued = _render_topic(request)
                sends = [await self._send(queued, event.key, event.value, admitted)]
                self.load.admitted(request)
                await job_events.send(self.app.producer, job_events.admitted(request, queue))
                return sends
            case Answer(result=result, request=request):
                return await self._answer(result, trace, request)
            case Drop(request_id=request_id):
                log.debug("dropped publish retry", extra={"request_id": request_id})
                return []
            case Invalid(error=error, result=result):
                await self._dead_letter(event, error, Stage.VALIDATE)
                if result is None:
                    return []
                # No webhook: an invalid record's webhook_url is not to be trusted.
                return await self._answer(result, trace, None)

    async def _answer(
        self, result: GenerationResult, trace: Headers, request: GenerationRequest | None
    ) -> list[Sent]:
        """Start the result's send, and tell watchers the request finished: best effort,
        but as surely as the result where a webhook is sent on it (`job_events`)."""
        sends = [await self._send(RESULTS, result.kafka_key, encode(result), trace)]
        if result.status in (Status.CANCELED, Status.EXPIRED):
            JOBS_ENDED_EARLY.labels(result.status.value, "intake").inc()
        finished = job_events.finished(result, request)
        if finished.request is None:
            await job_events.send(self.app.producer, finished)
        else:
            sends.append(await self._send(EVENTS, finished.kafka_key, encode(finished), []))
        return sends

    async def _unpublished(self, record: Started, failure: BaseException) -> None:
        """Dead-letter a record whose sends failed, answer it `publish_error`, and release
        its dedupe entry so that the user's retry is admitted. Exits, the batch unacked,
        when the answer cannot be written: the restarted processor decides the record again."""
        await self._dead_letter(record.event, failure, Stage.PUBLISH)
        if record.outcome is None:
            return
        message = record.event.message
        try:
            self._deciding(record.event)
            answer = self.intake.unpublished(
                record.outcome, message.partition, message.offset, failure
            )
            if answer is None:
                return
            for topic, delivered in await self._answer(answer, [], _request_of(record.outcome)):
                await delivered
                RECORDS_PRODUCED.labels(topic).inc()
        except Exception:
            log.critical("cannot answer a record its send failed; exiting", exc_info=True)
            os._exit(70)

    async def _dead_letter(self, event: EventT, error: BaseException, stage: Stage) -> None:
        message = event.message
        letter = DeadLetter.from_failure(
            error=error,
            stage=stage,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
            key=event.key,
            value=event.value,
            headers=_headers(event),
            attempts=1,
            group=PROCESSOR_GROUP,
        )
        where = {
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "stage": stage.value,
        }
        if stage is Stage.VALIDATE:
            log.warning("dead-lettered an invalid record: %s", error, extra=where)
        else:
            log.error("dead-lettered a record", exc_info=error, extra=where)
        try:
            if not fits(letter):
                # A record near the size limit: its letter would be over it (S3 blocks).
                letter = await asyncio.to_thread(spill, letter, ObjectStore(self.settings))
            _, delivered = await self._send(DLQ, letter.key, letter.value, letter.headers())
            await delivered
            DLQ_RECORDS.labels(stage.value).inc()
            RECORDS_PRODUCED.labels(DLQ).inc()
        except Exception:
            # The record is not acked yet: exiting now makes the next processor read it again.
            log.critical(
                "cannot write the dead letter to %s (or its original to the object store); "
                "exiting so the record is retried",
                DLQ,
                exc_info=True,
            )
            os._exit(70)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> Sent:
        """Hand a record to the producer; the returned awaitable resolves once the broker
        acknowledges it, and raises if it never does. (The producer itself, not a faust
        topic: the values are bytes already, and faust's channel machinery per record
        costs more than the rest of the intake.)"""
        acknowledged = await self.app.producer.send(
            topic, key, value, partition=None, timestamp=None, headers=headers
        )
        return topic, acknowledged

    def run(self, log_level: str | None = None, metrics_port: int | None = None) -> None:
        """Run until SIGTERM or SIGINT; faust's worker stops the app gracefully.

        `log_level` and `metrics_port` override the settings' (0 serves no metrics)."""
        settings = self.settings
        level = log_level or settings.log_level
        probe_broker_and_store(self.health.readiness, settings)
        metrics = serve(
            settings.processor_metrics_port if metrics_port is None else metrics_port,
            settings.metrics_host,
            setting="--metrics-port (or IMAGEGEN_PROCESSOR_METRICS_PORT)",
            health=self.health,
        )
        worker = faust.Worker(
            self.app,
            loglevel=level,
            logging_config=logging_config(settings, level),
            redirect_stdouts=False,
        )
        # At level warning and above faust spins a terminal spinner on every log record, and
        # lowers the root logger to DEBUG to feed it: every debug call then builds a record.
        worker.spinner = None
        # Lag is only worth reading where something scrapes it.
        lag = (
            LagMonitor(settings, PROCESSOR_GROUP, [REQUESTS])
            if metrics is not None
            else nullcontext()
        )
        # The book is read to its end before the first request is decided.
        with lag, self.cancellations, self.fleet:
            worker.execute_from_commandline()


def _make_app(settings: Settings, partitions: int, replication: int) -> faust.App:
    session_s = settings.kafka_session_timeout_ms / 1000
    return App(
        PROCESSOR_GROUP,
        settings=settings,
        broker=[f"kafka://{address.strip()}" for address in settings.kafka_bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
        datadir=str(Path(settings.state_dir) / "processor"),
        processing_guarantee="at_least_once",
        web_enabled=False,
        topic_partitions=partitions,
        topic_replication_factor=replication,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_s,
        broker_heartbeat_interval=session_s / 6,
        broker_rebalance_timeout=session_s,
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        # A batch's sends leave in a few produce requests instead of one each. Measured:
        # a 5 ms linger took a third less CPU per admission than none, and 1 ms admits as
        # many per second as 5 ms while holding each admission back 4 ms less.
        producer_linger=0.001,
    )


def _credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location)
        if settings.kafka_ssl_certificate_location:
            context.load_cert_chain(
                settings.kafka_ssl_certificate_location,
                settings.kafka_ssl_key_location,
                settings.kafka_ssl_key_password.get_secret_value()
                if settings.kafka_ssl_key_password
                else None,
            )
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    security = settings.kafka_security()  # validates that SASL has its credentials
    return faust.SASLCredentials(
        username=security["sasl.username"],
        password=security.get("sasl.password"),
        mechanism=security["sasl.mechanism"],
        ssl_context=context,
    )


def outcome_label(outcome: Outcome) -> str:
    """The `outcome` label of `imagegen_intake_requests_total` for an intake decision."""
    match outcome:
        case Admit():
            return "admitted"
        case Answer(result=result):
            if result.status in (Status.DUPLICATE, Status.CANCELED, Status.EXPIRED):
                return result.status.value
            return "rejected"
        case Drop():
            return "publish_retry"
        case Invalid():
            return "invalid"


def _intake_span(headers: Headers, outcome: Outcome) -> Span:
    """A span for the decision, the child of the trace the record carries. A record without
    one starts none: the intake is not where a request's trace begins."""
    if not trace_headers(headers):
        return Span([])
    attributes: dict[str, str] = {"imagegen.outcome": outcome_label(outcome)}
    if not isinstance(outcome, Invalid):
        attributes["imagegen.request_id"] = _request_id(outcome)
    return start_span("imagegen.intake", headers, kind="consumer", attributes=attributes)


def _request_id(outcome: Admit | Answer | Drop) -> str:
    match outcome:
        case Admit(request=request):
            return request.request_id
        case Answer(result=result):
            return result.request_id
        case Drop(request_id=request_id):
            return request_id


def _request_of(outcome: Outcome) -> GenerationRequest | None:
    match outcome:
        case Admit(request=request) | Answer(request=request):
            return request
        case _:
            return None


def _render_topic(request: GenerationRequest) -> str:
    """Workers take `interactive` work first, and `batch` work only while none waits."""
    return RENDER_BATCH if request.priority == "batch" else RENDER


def _untraced(headers: Headers) -> Headers:
    return [(name, value) for name, value in headers if name not in (TRACEPARENT, TRACESTATE)]


def _headers(event: EventT) -> Headers:
    headers = event.message.headers or []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name, value or b"") for name, value in items]


def _now_ms() -> bytes:
    return str(int(time.time() * 1000)).encode()
