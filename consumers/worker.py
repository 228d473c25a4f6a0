"""The render worker: admitted requests from `imagegen.render` (interactive) and
`imagegen.render.batch` (batch) become images in the object store and results on
`imagegen.results`; failures become dead letters; watchers see each job on `imagegen.events`.

This module is the poll loop and what happens around it: rebalances, back-pressure, shutdown.
The rest of the worker lives beside it:
- `imagegen.consumers.pipeline`: the check pool, the render thread and the finish pool that
  turn each request into an image;
- `imagegen.consumers.priority`: which partitions are fetched: back-pressure, and batch work
  only while no interactive work waits;
- `imagegen.consumers.lifecycle`: cancellations (from the `CancelBook`) and deadlines, which
  end a job before or during its render; `imagegen.consumers.progress`: its events;
- `imagegen.consumers.outcomes`: the results and dead letters that say how a request ended;
- `imagegen.consumers.outbox`: the producer, its delivery thread, and which offsets are done;
- `imagegen.consumers.clients`: the broker and object-store clients, built for the worker.

Threads, and what each one owns:
- the poll loop (`run`, the caller's thread) owns the consumers, one per topic
  (`imagegen.consumers.clients` says why). It polls, pauses and resumes partitions
  (`FetchGate`: every partition while too much work is in flight, the batch ones while
  interactive work waits), and stores the offsets of finished work. Nothing else touches
  the consumers.
- the cancellation book's reading thread, which it starts before subscribing, so that every
  cancellation published before the worker started is honoured.
- the pipeline's pools and render thread, and the outbox's delivery thread. If the render
  or the delivery thread dies, or a pool's job cannot end, the worker stops
  (`_thread_crashed`).
- on SIGTERM, a drain thread waits for that work to finish while the poll loop keeps
  polling, so that the consumer stays in its group until the final commit.

Observability: each request gets a span (`imagegen.infra.tracing`) from the moment it is accepted
until its result is published, as the child of the trace context in its headers; the
result carries that span's `traceparent`, and a dead letter keeps the original headers, so
a replay continues the original trace. Every log line about a request carries its
`request_id` (and partition, offset, trace id): the work of each request runs inside its
`log_context`.

The worker stops, too, rather than live on holding partitions it cannot serve (`_stop_broken`),
when a record it produces cannot be written (`imagegen.consumers.outbox`) and when the
consumer reports an error that waiting does not fix (`imagegen.consumers.broker_errors`).
What it leaves unfinished stays uncommitted, and `run` raises `WorkerCrashed`. Outages it
rides out: while the object store is unreachable, the jobs that retry it fill the in-flight
limit, which pauses the partitions, and the loop polls on, so the worker stays in its group.

Commit order, enforced in `_store_finished`: an offset is stored only once the outbox has
finished it, which it does once everything produced for the record (its result and
`finished` event and, for a failure, its dead letter) has settled
(`imagegen.consumers.outbox`), and once every earlier offset of the partition is finished
too (an `OffsetTracker` per topic). librdkafka's background commit commits stored offsets
only, so a crash replays unfinished work and skips nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from imagegen.consumers.broker_errors import stops_the_worker, what_to_fix
from imagegen.consumers.clients import WorkerClients, make_worker_clients
from imagegen.consumers.crashes import CrashLedger
from imagegen.consumers.jobs import Job, Polled, admitted_at_ms, consumed_headers
from imagegen.consumers.lifecycle import Lifecycle
from imagegen.consumers.offsets import OffsetTracker
from imagegen.consumers.outbox import Outbox
from imagegen.consumers.outcomes import Outcomes
from imagegen.consumers.pipeline import RenderPipeline
from imagegen.consumers.priority import INTERACTIVE, TOPICS, FetchGate
from imagegen.consumers.progress import JobEvents
from imagegen.consumers.rendering import Renderer
from imagegen.consumers.retry import RetryPolicy
from imagegen.infra.cancel_book import CancelBook
from imagegen.infra.health import Health
from imagegen.infra.kafka import consume_available
from imagegen.infra.metrics import ASSIGNED_PARTITIONS, IN_FLIGHT, RECORDS_CONSUMED
from imagegen.infra.settings import Settings
from imagegen.infra.topics import ensure_topics
from imagegen.infra.tracing import start_span
from imagegen.schemas import GenerationRequest, decode
from imagegen.schemas.errors import WorkerCrashed
from imagegen.schemas.topics import RENDER, RENDER_BATCH, WORKER_GROUPS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    max_batch: int = 4
    max_wait_ms: float = 10.0
    #: Requests in flight (queued, rendering, finishing) before partitions pause.
    max_in_flight: int = 32
    #: Batch requests in flight before the batch partitions pause; default 2 x max_batch.
    max_batch_in_flight: int | None = None
    check_threads: int = 4
    finish_threads: int = 4


class RenderWorker:
    def __init__(
        self,
        settings: Settings,
        renderers: Mapping[str, Renderer],
        options: WorkerOptions | None = None,
        clients: WorkerClients | None = None,
        health: Health | None = None,
    ) -> None:
        """`renderers` maps the model names that requests use to what renders them;
        `clients` are built from `settings` unless given; `health` is what the metrics port
        serves: the poll loop beats on it, and each consumer's first assignment meets the
        condition of its group."""
        self.settings = settings
        self._health = health or Health()
        self.options = options or WorkerOptions()
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        if clients is None:
            clients = make_worker_clients(settings)
        ensure_topics(clients.admin, settings)
        self._consumers = clients.consumers
        self._serving = ", ".join(renderers)
        self._trackers = {topic: OffsetTracker() for topic in TOPICS}
        policy = RetryPolicy(
            settings.max_attempts, settings.retry_base_delay_s, settings.outage_budget_s
        )
        self._outbox = Outbox(clients.producer, policy, self._stop_broken)
        crashes = CrashLedger(Path(settings.state_dir) / "worker" / "crashes")
        events = JobEvents(self._outbox, self.worker_id)
        self._outcomes = Outcomes(self._outbox, crashes, clients.store, self.worker_id, events)
        self._book = CancelBook(settings)
        # Each held partition's assignment epoch. A job polled in an earlier epoch of its
        # partition is stale: the partition was revoked or lost since, its next owner redoes
        # the job, and this completion is ignored.
        self._epochs: dict[tuple[str, int], int] = {}
        self._next_epoch = 0
        self._crashed: str | None = None  # why the worker stopped early, if it did
        self._stopping = threading.Event()
        self._pipeline = RenderPipeline(
            renderers,
            clients.store,
            crashes,
            self._outcomes,
            policy,
            max_batch=self.options.max_batch,
            max_wait_s=self.options.max_wait_ms / 1000,
            check_threads=self.options.check_threads,
            finish_threads=self.options.finish_threads,
            stopping=self._stopping,
            is_current=lambda job: self._is_current(job.polled),
            lifecycle=Lifecycle(self._book.honoured, settings.default_ttl_s, events),
        )
        self._gate = FetchGate(
            self._consumers,
            self.options.max_in_flight,
            self.options.max_batch_in_flight or 2 * self.options.max_batch,
            interactive_queued=lambda: self._pipeline.queued(INTERACTIVE),
        )

    # ---- the poll loop ------------------------------------------------------------------

    def run(self) -> None:
        """Consume until SIGTERM or SIGINT, then drain and commit (`stop` does the same)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopping.set())
        self._book.start()
        self._pipeline.start(on_crash=self._thread_crashed)
        self._outbox.start(on_crash=self._thread_crashed)
        for topic, consumer in self._consumers.items():
            consumer.subscribe(
                [topic],
                # Told its group: an empty assignment names no topic.
                on_assign=partial(self._on_assign, WORKER_GROUPS[topic]),
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        for topic in TOPICS:
            ASSIGNED_PARTITIONS.labels(topic)  # served as 0 until the first assignment
        log.info("worker %s serving %s", self.worker_id, self._serving)
        while not self._stopping.is_set():
            self._health.liveness.beat("poll loop")
            for topic, consumer in self._consumers.items():
                # Waiting happens on the interactive consumer only; batch records are
                # taken as they are, so an idle loop turns ten times a second.
                wait_s = 0.1 if topic == RENDER else 0.0
                limit = self._gate.poll_limit(self._in_flight(), self._batch_in_flight())
                for message in consume_available(consumer, limit, wait_s):
                    self._accept(message)
            self._store_finished()
            self._update_fetching()
        self._shutdown()
        if self._crashed is not None:
            raise WorkerCrashed(
                f"{self._crashed} The worker stopped; its unfinished requests stay "
                "uncommitted, for the next worker to read again."
            )

    def stop(self) -> None:
        self._stopping.set()

    def _thread_crashed(self) -> None:
        """Stop the worker: a vital thread died, or a pool's job could not end (this runs in
        that thread, inside its `except` block)."""
        name = threading.current_thread().name
        log.critical("the %s thread crashed", name, exc_info=True)
        self._stop_broken(
            f"The worker's {name} thread crashed (traceback above): restart the worker, and "
            "report the traceback if it recurs."
        )

    def _stop_broken(self, why: str) -> None:
        """Stop the worker, which cannot go on serving its partitions; any thread may call."""
        log.critical("stopping: %s", why)
        if self._crashed is None:
            self._crashed = why
        self._stopping.set()
        self._pipeline.stop_rendering()

    def _accept(self, message: Message) -> None:
        consumer_error = message.error()
        if consumer_error is not None:
            if stops_the_worker(consumer_error):
                self._stop_broken(f"The consumer cannot go on: {what_to_fix(consumer_error)}")
            else:
                log.warning("consumer error: %s", consumer_error)
            return
        polled = Polled.of(message, self._epochs)
        RECORDS_CONSUMED.labels(polled.topic).inc()
        self._trackers[polled.topic].started(polled.partition, polled.offset)
        try:
            request = decode(GenerationRequest, message.value())
        except Exception as error:
            # The processor admits valid requests only; this record came another way.
            self._dead_letter_unreadable(message, polled, error)
            return
        span = start_span(
            "imagegen.render",
            consumed_headers(message),
            kind="consumer",
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": polled.topic,
                "imagegen.request_id": request.request_id,
                "imagegen.user_id": request.user_id,
                "imagegen.model": request.model,
            },
        )
        self._pipeline.submit(Job(message, polled, request, admitted_at_ms(message), span))

    def _dead_letter_unreadable(self, message: Message, polled: Polled, error: Exception) -> None:
        try:
            self._outcomes.unreadable(message, polled, error)
        except Exception:
            log.critical("cannot dead-letter an unreadable record", exc_info=True)
            self._stop_broken(
                f"The dead letter of the unreadable record {polled} could not be built or "
                "sent (traceback above): report the traceback."
            )

    def _store_finished(self) -> None:
        offsets: dict[str, list[TopicPartition]] = {}
        for polled in self._outbox.finished():
            if not self._is_current(polled):
                continue  # from before a rebalance: the partition's owner redoes it
            tracker = self._trackers[polled.topic]
            committable = tracker.finished(polled.partition, polled.offset)
            if committable is not None:
                offset = TopicPartition(polled.topic, polled.partition, committable)
                offsets.setdefault(polled.topic, []).append(offset)
        for topic, stored in offsets.items():
            self._consumers[topic].store_offsets(offsets=stored)

    def _is_current(self, polled: Polled) -> bool:
        return self._epochs.get((polled.topic, polled.partition)) == polled.generation

    def _in_flight(self) -> int:
        return sum(tracker.in_flight() for tracker in self._trackers.values())

    def _batch_in_flight(self) -> int:
        return self._trackers[RENDER_BATCH].in_flight()

    def _update_fetching(self) -> None:
        in_flight = self._in_flight()
        IN_FLIGHT.set(in_flight)
        self._gate.update(in_flight, self._batch_in_flight())

    # ---- rebalances -----------------------------------------------------------------------

    # Assignment is cooperative-sticky (`imagegen.consumers.clients`): a rebalance revokes
    # only the partitions that move and then adds theirs to their new owner, so every other
    # partition goes on being fetched and rendered throughout.

    def _on_assign(self, group: str, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Add `partitions` to what this worker holds, in a new epoch."""
        consumer.incremental_assign(partitions)
        # Called at every rebalance, with no partitions too: a worker beyond the partition
        # count is in its group, idle, and ready to take over.
        self._health.readiness.joined(group)
        for tp in partitions:
            if (tp.topic, tp.partition) not in self._epochs:
                ASSIGNED_PARTITIONS.labels(tp.topic).inc()
            self._epochs[(tp.topic, tp.partition)] = self._next_epoch
        self._next_epoch += 1
        if self._stopping.is_set():
            # Assigned while draining: nothing more is fetched, the next owner reads them.
            consumer.pause(partitions)
        else:
            self._gate.assigned(partitions)
        if partitions:
            log.info("assigned %s", _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is finished; work still in flight for these partitions is left to
        their next owner (it finds any image already stored and does not render again)."""
        self._store_finished()
        _commit(consumer)
        self._forget(partitions)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)
        log.warning("lost %s to another worker", _names(partitions))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._trackers[tp.topic].forget([tp.partition])
            if self._epochs.pop((tp.topic, tp.partition), None) is not None:
                ASSIGNED_PARTITIONS.labels(tp.topic).dec()

    # ---- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop fetching, finish what is rendering, release what is queued, commit."""
        log.info("stopping: finishing in-flight work")
        self._health.readiness.wait_for("stopping", "finishing in-flight work")
        for consumer in self._consumers.values():
            consumer.pause(consumer.assignment())
        with ThreadPoolExecutor(1, "drain") as drain:
            drained = drain.submit(self._drain)
            # The consumer keeps polling while in-flight work finishes: a render longer
            # than max.poll.interval.ms would otherwise make it leave the group, and the
            # final commit would fail. Its partitions are paused (`_on_assign` pauses any
            # assigned meanwhile); a record that still arrives, fetched before the pause,
            # is left uncommitted for the partition's next owner.
            while not drained.done():
                self._health.liveness.beat("poll loop")
                for consumer in self._consumers.values():
                    message = consumer.poll(0.05)
                    if message is not None and message.error() is not None:
                        log.warning("consumer error while stopping: %s", message.error())
        try:
            released = drained.result()
        finally:
            # What finished is committable even if the drain failed part of the way.
            self._store_finished()
            for consumer in self._consumers.values():
                _commit(consumer)
                consumer.close()
            self._book.close()
        log.info("stopped; %d queued request(s) released to the next owner", len(released))

    def _drain(self) -> list[Job]:
        """Finish what is rendering, being stored and being sent; return the queued jobs,
        released."""
        released = self._pipeline.drain()
        self._outbox.close()
        return released


def _names(partitions: list[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)


def _commit(consumer: Consumer) -> None:
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", exc)
