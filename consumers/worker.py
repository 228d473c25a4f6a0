"""The render worker: admitted requests from `imagegen.render` become images in the object
store and results on `imagegen.results`; failures become dead letters.

Threads, and what each one owns:
- the poll loop (`run`, the caller's thread) owns the consumer. It polls, pauses the
  partitions while too much work is in flight, and stores the offsets of finished work.
  Nothing else touches the consumer.
- a check pool looks every new request up in the object store: an image that an earlier
  attempt stored (and crashed before committing) is published again without rendering. It
  also reads what worker processes that died rendering the request left
  (`imagegen.consumers.crashes`): such a request renders alone, and fails without rendering once
  too many died rendering it alone.
- the render thread batches compatible requests and runs the pipeline, holding a crash mark
  per request meanwhile, and nothing else, so the device waits only for batching.
- a finish pool encodes, stores and publishes every rendered image.
- a delivery thread serves the producer's delivery reports.
- on SIGTERM, a drain thread waits for that work to finish while the poll loop keeps
  polling, so that the consumer stays in its group until the final commit.

Observability: each request gets a span (`imagegen.infra.tracing`) from the moment it is accepted
until its result is published, as the child of the trace context in its headers; the
result carries that span's `traceparent`, and a dead letter keeps the original headers, so
a replay continues the original trace. Every log line about a request carries its
`request_id` (and partition, offset, trace id): the work of each request runs inside its
`log_context`.

Commit order, enforced in `_store_finished`: an offset is stored only once the broker has
acknowledged the request's result (and, for a failure, its dead letter), and once every
earlier offset of the partition is finished too (`OffsetTracker`). librdkafka's background
commit commits stored offsets only, so a crash replays unfinished work and skips nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from PIL import Image

from imagegen.consumers.batching import Batcher
from imagegen.consumers.crashes import Crashes, CrashLedger, Record, RenderKilledWorkers
from imagegen.consumers.models import UnknownModel
from imagegen.consumers.offsets import OffsetTracker
from imagegen.consumers.rendering import Renderer, batch_key, encode_image, seed_for
from imagegen.consumers.retry import GaveUp, Interrupted, RetryPolicy, is_transient, retrying
from imagegen.consumers.storage import StoredImage, find, object_key, store_once
from imagegen.infra.kafka import (
    check_broker,
    consume_available,
    make_admin,
    make_consumer,
    make_producer,
)
from imagegen.infra.logs import log_context
from imagegen.infra.metrics import (
    DLQ_RECORDS,
    ENCODE_SECONDS,
    IN_FLIGHT,
    RECORDS_CONSUMED,
    RECORDS_PRODUCED,
    RENDER_BATCH_SIZE,
    RENDER_SECONDS,
    UPLOAD_SECONDS,
    observe_gpu_memory,
)
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.infra.topics import ensure_topics
from imagegen.infra.tracing import Span, start_span
from imagegen.schemas import (
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    Reason,
    Stage,
    Status,
    Timings,
    decode,
    encode,
)
from imagegen.schemas.errors import WorkerCrashed
from imagegen.schemas.fields import utc_now
from imagegen.schemas.headers import ADMITTED_AT_HEADER
from imagegen.schemas.topics import DLQ, RENDER, RESULTS, WORKER_GROUP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    max_batch: int = 4
    max_wait_ms: float = 10.0
    #: Requests in flight (queued, rendering, finishing) before partitions pause.
    max_in_flight: int = 32
    check_threads: int = 4
    finish_threads: int = 4


@dataclass
class Job:
    """One record of `imagegen.render` on its way through the worker."""

    message: Message
    request: GenerationRequest
    generation: int  # the assignment it was polled in; older jobs' completions are ignored
    admitted_at_ms: int
    span: Span
    crashes: Crashes = field(default_factory=Crashes)  # left by processes that died on it
    render_started_ms: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


class RenderWorker:
    def __init__(
        self,
        settings: Settings,
        renderers: Mapping[str, Renderer],
        options: WorkerOptions | None = None,
    ) -> None:
        """`renderers` maps the model names that requests use to what renders them."""
        self.settings = settings
        self.options = options or WorkerOptions()
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self._renderers = dict(renderers)
        self._policy = RetryPolicy(settings.max_attempts, settings.retry_base_delay_s)
        check_broker(settings)
        ensure_topics(make_admin(settings), settings)
        self._store = ObjectStore(settings)
        self._producer = make_producer(settings)
        self._consumer: Consumer = make_consumer(
            settings,
            WORKER_GROUP,
            # The poll loop never blocks on work, so a short interval costs nothing, and
            # some brokers (Tansu) hold a group's first join for half of it.
            **{"max.poll.interval.ms": max(settings.kafka_session_timeout_ms, 1000)},
        )
        self._tracker = OffsetTracker()
        self._finished: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()
        self._crashes = CrashLedger(Path(settings.state_dir) / "worker" / "crashes")
        self._batcher: Batcher[Job] = Batcher(
            _batch_key, self.options.max_batch, self.options.max_wait_ms / 1000
        )
        self._generation = 0
        self._paused = False
        self._crashed: str | None = None  # the name of a thread that died, if one did
        self._stopping = threading.Event()
        self._stop_rendering = threading.Event()
        self._closed = threading.Event()
        # Object keys with a job in flight, and the jobs for the same key that wait for it
        # (a request replayed while its first attempt still runs renders once).
        self._claims: dict[str, tuple[Job, list[Job]]] = {}
        self._claims_lock = threading.Lock()
        self._checks = ThreadPoolExecutor(self.options.check_threads, "check")
        self._finishers = ThreadPoolExecutor(self.options.finish_threads, "finish")

    # ---- the poll loop ------------------------------------------------------------------

    def run(self) -> None:
        """Consume until SIGTERM or SIGINT, then drain and commit (`stop` does the same)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopping.set())
        threads = [
            threading.Thread(target=self._fatal_on_crash(self._render_loop), name="render"),
            threading.Thread(target=self._fatal_on_crash(self._deliver_loop), name="delivery"),
        ]
        for thread in threads:
            thread.daemon = True
        for thread in threads:
            thread.start()
        self._consumer.subscribe(
            [RENDER], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("worker %s serving %s", self.worker_id, ", ".join(self._renderers))
        while not self._stopping.is_set():
            for message in consume_available(self._consumer, self.options.max_in_flight, 0.1):
                self._accept(message)
            self._store_finished()
            self._apply_backpressure()
        self._shutdown(threads)
        if self._crashed is not None:
            raise WorkerCrashed(
                f"the worker's {self._crashed} thread crashed (traceback above) and the worker "
                "stopped; its unfinished requests stay uncommitted for the next worker. "
                "Restart it, and report the traceback if it recurs."
            )

    def stop(self) -> None:
        self._stopping.set()

    def _fatal_on_crash(self, loop: Callable[[], None]) -> Callable[[], None]:
        """`loop`, stopping the worker if it ever raises: a worker without its render or
        delivery thread would otherwise live on and hold its partitions doing nothing."""

        def guarded() -> None:
            try:
                loop()
            except BaseException:
                name = threading.current_thread().name
                log.critical("the %s thread crashed", name, exc_info=True)
                self._crashed = name
                self._stopping.set()
                self._stop_rendering.set()

        return guarded

    def _accept(self, message: Message) -> None:
        if message.error() is not None:
            log.warning("consumer error: %s", message.error())
            return
        RECORDS_CONSUMED.labels(RENDER).inc()
        self._tracker.started(message.partition(), message.offset())
        try:
            request = decode(GenerationRequest, message.value())
        except Exception as error:
            # The processor admits valid requests only; this record came another way.
            self._dead_letter_only(message, error, Stage.VALIDATE)
            return
        span = start_span(
            "imagegen.render",
            message.headers() or [],
            kind="consumer",
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": RENDER,
                "imagegen.request_id": request.request_id,
                "imagegen.user_id": request.user_id,
                "imagegen.model": request.model,
            },
        )
        job = Job(message, request, self._generation, _admitted_at_ms(message), span)
        self._checks.submit(self._guarded, job, Stage.STORE, self._check, job)

    def _store_finished(self) -> None:
        offsets: list[TopicPartition] = []
        while True:
            try:
                generation, partition, offset = self._finished.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue  # from before a rebalance: the partition's owner redoes it
            committable = self._tracker.finished(partition, offset)
            if committable is not None:
                offsets.append(TopicPartition(RENDER, partition, committable))
        if offsets:
            self._consumer.store_offsets(offsets=offsets)

    def _apply_backpressure(self) -> None:
        in_flight = self._tracker.in_flight()
        IN_FLIGHT.set(in_flight)
        if not self._paused and in_flight >= self.options.max_in_flight:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
        elif self._paused and in_flight <= self.options.max_in_flight // 2:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(p.partition for p in partitions))
        self._paused = False
        if self._stopping.is_set():
            # Assigned while draining: nothing more is fetched, the next owner reads them.
            consumer.assign(partitions)
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is finished; work still in flight for these partitions is left to
        their next owner (it finds any image already stored and does not render again)."""
        self._store_finished()
        _commit(consumer)
        self._tracker.forget([p.partition for p in partitions])
        self._generation += 1
        log.info("revoked %s", sorted(p.partition for p in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._tracker.forget([p.partition for p in partitions])
        self._generation += 1
        log.warning("lost %s to another worker", sorted(p.partition for p in partitions))

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        """Stop fetching, finish what is rendering, release what is queued, commit."""
        log.info("stopping: finishing in-flight work")
        self._consumer.pause(self._consumer.assignment())
        with ThreadPoolExecutor(1, "drain") as drain:
            drained = drain.submit(self._drain, threads)
            # The consumer keeps polling while in-flight work finishes: a render longer
            # than max.poll.interval.ms would otherwise make it leave the group, and the
            # final commit would fail. Its partitions are paused (`_on_assign` pauses any
            # assigned meanwhile); a record that still arrives, fetched before the pause,
            # is left uncommitted for the partition's next owner.
            while not drained.done():
                message = self._consumer.poll(0.1)
                if message is not None and message.error() is not None:
                    log.warning("consumer error while stopping: %s", message.error())
        try:
            released = drained.result()
        finally:
            # What finished is committable even if the drain failed part of the way.
            self._store_finished()
            _commit(self._consumer)
            self._consumer.close()
        log.info("stopped; %d queued request(s) released to the next owner", len(released))

    def _drain(self, threads: list[threading.Thread]) -> list[Job]:
        """Finish what is rendering and being stored; return the queued jobs, released."""
        self._checks.shutdown(wait=True)
        self._stop_rendering.set()
        threads[0].join()
        released = self._batcher.drain()
        self._finishers.shutdown(wait=True)
        self._producer.flush(30)
        self._closed.set()
        threads[1].join()
        return released

    # ---- checks, rendering, finishing (pool and render threads) --------------------------

    def _check(self, job: Job) -> None:
        if job.request.model not in self._renderers:
            raise UnknownModel(
                f"model {job.request.model!r} is not served by this worker, which serves: "
                f"{', '.join(self._renderers)}; start workers with --model {job.request.model}"
            )
        if not self._claim(job):
            return
        key = object_key(job.request)
        stored, _ = retrying(
            self._policy,
            f"look up {key}",
            lambda: find(self._store, key),
            self._stopping,
            stage=Stage.STORE.value,
        )
        if stored is None:
            self._check_crashes(job)
            self._batcher.put(job)
        else:
            log.info("%s was stored by an earlier attempt; publishing it", key)
            self._crashes.forget(_record(job))
            self._publish_success(job, stored, attempts=1, batch_size=None)

    def _check_crashes(self, job: Job) -> None:
        """Note what processes that died rendering the job left; give up on it, as a poison
        request that would kill every worker it reaches, once too many died rendering it
        alone."""
        job.crashes = self._crashes.crashes(_record(job))
        if job.crashes.alone >= self.settings.max_attempts:
            raise GaveUp(
                RenderKilledWorkers(
                    f"{job.crashes.alone} worker process(es) died while rendering this request "
                    "alone (killed for memory, or a crash in native code), so it is not "
                    "rendered again. Find the cause in the worker logs and metrics (its size, "
                    "steps, model), then replay it from the DLQ with more memory or smaller "
                    "settings"
                ),
                job.crashes.alone,
            )
        if job.crashes.suspect:
            log.warning(
                "a worker process died while rendering %s; rendering it alone (%d of %d "
                "deaths alone before it fails)",
                job.request.request_id,
                job.crashes.alone,
                self.settings.max_attempts,
            )

    def _claim(self, job: Job) -> bool:
        """Take the job's object key, or queue the job behind the one holding it."""
        key = object_key(job.request)
        with self._claims_lock:
            if key in self._claims:
                self._claims[key][1].append(job)
                return False
            self._claims[key] = (job, [])
            return True

    def _release(self, job: Job) -> None:
        """The job is done with its key: jobs waiting for it are checked again (and find the
        stored image, unless this job failed)."""
        job.span.end()
        key = object_key(job.request)
        with self._claims_lock:
            holder, waiting = self._claims.get(key, (None, []))
            if holder is not job:
                return
            del self._claims[key]
        for waiter in waiting:
            if not self._stopping.is_set():  # when stopping, they stay uncommitted
                self._checks.submit(self._guarded, waiter, Stage.STORE, self._check, waiter)

    def _render_loop(self) -> None:
        while not self._stop_rendering.is_set():
            batch = []
            for job in self._batcher.next_batch(0.1):
                if job.generation == self._generation:
                    batch.append(job)
                else:
                    self._release(job)  # polled before a rebalance: its partition's owner redoes it
            if batch:
                self._render(batch)

    def _render(self, batch: list[Job]) -> None:
        context: AbstractContextManager[None]
        if len(batch) == 1:
            context = _job_context(batch[0])
        else:
            context = log_context(request_ids=[job.request.request_id for job in batch])
        with context:
            alone = self._render_batch(batch)
        # One bad request must not fail the others: render them one by one.
        for job in alone:
            self._render([job])

    def _render_batch(self, batch: list[Job]) -> list[Job]:
        """Render `batch` and hand its images to the finishers; return the jobs to render
        again one at a time, after a permanent failure of the batch as a whole."""
        first = batch[0].request
        renderer = self._renderers[first.model]
        log.debug(
            "rendering %d request(s) with %s: %dx%d, %d steps",
            len(batch),
            first.model,
            first.width,
            first.height,
            first.steps,
        )
        started = time.perf_counter()
        started_ms = _now_ms()
        try:
            with self._crashes.rendering([(_record(job), job.crashes) for job in batch]):
                images, attempts = retrying(
                    self._policy,
                    "render",
                    lambda: renderer.render([job.request for job in batch]),
                    self._stopping,
                    stage=Stage.RENDER.value,
                )
        except Interrupted:
            for job in batch:  # uncommitted: the partition's next owner renders them
                self._release(job)
            return []
        except GaveUp as gave_up:
            if len(batch) > 1 and not is_transient(gave_up.error):
                return batch
            for job in batch:
                self._fail(job, gave_up.error, Stage.RENDER, gave_up.attempts)
            return []
        finally:
            observe_gpu_memory(renderer.device)
        render_s = time.perf_counter() - started
        RENDER_SECONDS.observe(render_s)
        RENDER_BATCH_SIZE.observe(len(batch))
        render_ms = render_s * 1000
        for job, image in zip(batch, images, strict=True):
            job.span.set_attribute("imagegen.batch_size", len(batch))
            job.render_started_ms = started_ms
            job.timings["render_ms"] = render_ms
            self._finishers.submit(
                self._guarded, job, Stage.STORE, self._finish, job, image, len(batch), attempts
            )
        return []

    def _finish(self, job: Job, image: Image.Image, batch_size: int, attempts: int) -> None:
        started = time.perf_counter()
        data, content_type = encode_image(image, job.request.output_format)
        encoded = time.perf_counter()
        key = object_key(job.request)
        stored, store_attempts = retrying(
            self._policy,
            f"store {key}",
            lambda: store_once(self._store, key, data, content_type),
            self._stopping,
            stage=Stage.STORE.value,
        )
        uploaded = time.perf_counter()
        ENCODE_SECONDS.observe(encoded - started)
        UPLOAD_SECONDS.observe(uploaded - encoded)
        job.timings["encode_ms"] = (encoded - started) * 1000
        job.timings["upload_ms"] = (uploaded - encoded) * 1000
        self._publish_success(job, stored, max(attempts, store_attempts), batch_size)

    def _guarded(self, job: Job, stage: Stage, work: Callable[..., None], *args: Any) -> None:
        """Run pool work so that no exception vanishes into a future: every failure becomes
        a failed result and a dead letter."""
        with _job_context(job):
            try:
                work(*args)
            except Interrupted:
                log.info("released %s unfinished: the worker is stopping", job.request.request_id)
                self._release(job)
            except GaveUp as gave_up:
                self._fail(job, gave_up.error, _stage_of(gave_up.error, stage), gave_up.attempts)
            except Exception as error:
                self._fail(job, error, _stage_of(error, stage), 1)

    # ---- publishing ----------------------------------------------------------------------

    def _publish_success(
        self, job: Job, stored: StoredImage, attempts: int, batch_size: int | None
    ) -> None:
        request = job.request
        result = GenerationResult(
            request_id=request.request_id,
            user_id=request.user_id,
            status=Status.SUCCEEDED,
            bucket=self.settings.s3_bucket,
            object_key=stored.key,
            content_type=stored.content_type,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            width=request.width,
            height=request.height,
            model=request.model,
            seed=seed_for(request),
            steps=request.steps,
            batch_size=batch_size,
            timings=self._timings(job),
            attempts=attempts,
            worker_id=self.worker_id,
            completed_at=utc_now(),
        )

        def delivered(error: KafkaError | None) -> None:
            if error is None:
                self._finished.put((job.generation, *_coordinates(job.message)))
            else:
                self._dead_letter_only(job.message, KafkaException(error), Stage.PUBLISH, job)

        job.span.set_attribute("imagegen.attempts", attempts)
        self._send(RESULTS, result.kafka_key, encode(result), delivered, job.span.headers)
        log.info(
            "%s succeeded: %s (%d bytes, %d attempt(s))",
            request.request_id,
            stored.key,
            stored.size_bytes,
            attempts,
        )
        self._release(job)

    def _fail(self, job: Job, error: BaseException, stage: Stage, attempts: int) -> None:
        """A failed result for the user and a dead letter for operators; the offset counts
        as finished once both are acknowledged (the dead letter is what must not be lost)."""
        with _job_context(job):
            log.error(
                "%s failed at %s after %d attempt(s): %s",
                job.request.request_id,
                stage.value,
                attempts,
                error,
                extra={"stage": stage.value},
            )
        job.span.set_attribute("imagegen.attempts", attempts)
        job.span.end(error)
        result = GenerationResult(
            request_id=job.request.request_id,
            user_id=job.request.user_id,
            status=Status.FAILED,
            reason=_reason(error, stage),
            detail=f"{type(error).__name__}: {error}"[:4000],
            model=job.request.model,
            attempts=attempts,
            worker_id=self.worker_id,
            completed_at=utc_now(),
        )
        self._send(RESULTS, result.kafka_key, encode(result), lambda _error: None, job.span.headers)
        self._dead_letter_only(job.message, error, stage, job, attempts)
        self._release(job)

    def _dead_letter_only(
        self,
        message: Message,
        error: BaseException,
        stage: Stage,
        job: Job | None = None,
        attempts: int = 1,
    ) -> None:
        letter = DeadLetter.from_failure(
            error=error,
            stage=stage,
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            timestamp_ms=message.timestamp()[1],
            key=message.key(),
            value=message.value(),
            headers=message.headers(),
            attempts=attempts,
            group=WORKER_GROUP,
        )
        generation = job.generation if job is not None else self._generation

        def delivered(delivery_error: KafkaError | None) -> None:
            if delivery_error is not None:
                # Without its dead letter the record must not be committed: exit before its
                # offset is stored, so that it is read again.
                log.critical(
                    "cannot write to %s (%s); exiting",
                    DLQ,
                    delivery_error,
                    extra={
                        "request_id": job.request.request_id if job is not None else None,
                        "topic": message.topic(),
                        "partition": message.partition(),
                        "offset": message.offset(),
                        "stage": stage.value,
                    },
                )
                os._exit(70)
            DLQ_RECORDS.labels(stage.value).inc()
            if job is not None:
                self._crashes.forget(_record(job))  # the dead letter keeps the record now
            self._finished.put((generation, *_coordinates(message)))

        self._send(DLQ, letter.key, letter.value, delivered, letter.headers())

    def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        delivered: Callable[[KafkaError | None], None],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        produced = RECORDS_PRODUCED.labels(topic)

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                produced.inc()
            delivered(error)

        while True:
            try:
                self._producer.produce(
                    topic, key=key, value=value, headers=headers or None, on_delivery=on_delivery
                )
                return
            except BufferError:
                time.sleep(0.01)  # the local queue is full; the delivery thread drains it

    def _deliver_loop(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def _timings(self, job: Job) -> Timings:
        now_ms = _now_ms()
        started_ms = job.render_started_ms
        submitted_ms = job.request.submitted_at.timestamp() * 1000
        return Timings(
            queue_ms=max(0.0, started_ms - job.admitted_at_ms) if started_ms else None,
            render_ms=job.timings.get("render_ms"),
            encode_ms=job.timings.get("encode_ms"),
            upload_ms=job.timings.get("upload_ms"),
            total_ms=max(0.0, now_ms - submitted_ms),
        )


def _job_context(job: Job) -> AbstractContextManager[None]:
    return log_context(
        request_id=job.request.request_id,
        user_id=job.request.user_id,
        topic=job.message.topic(),
        partition=job.message.partition(),
        offset=job.message.offset(),
        trace_id=job.span.trace_id,
    )


def _batch_key(job: Job) -> Hashable | None:
    # A request that a worker died rendering renders alone (None): it may kill the next one
    # too, and must take no company with it.
    return None if job.crashes.suspect else batch_key(job.request)


def _record(job: Job) -> Record:
    topic, partition, offset = job.message.topic(), job.message.partition(), job.message.offset()
    return Record(topic, partition, offset, job.request.request_id)


def _admitted_at_ms(message: Message) -> int:
    for name, value in message.headers() or []:
        if name == ADMITTED_AT_HEADER and value:
            return int(value)
    return message.timestamp()[1]


def _coordinates(message: Message) -> tuple[int, int]:
    return message.partition(), message.offset()


def _stage_of(error: BaseException, default: Stage) -> Stage:
    return Stage.RENDER if isinstance(error, UnknownModel | RenderKilledWorkers) else default


def _reason(error: BaseException, stage: Stage) -> Reason:
    if isinstance(error, UnknownModel):
        return Reason.UNKNOWN_MODEL
    return {Stage.RENDER: Reason.RENDER_ERROR, Stage.PUBLISH: Reason.PUBLISH_ERROR}.get(
        stage, Reason.STORE_ERROR
    )


def _commit(consumer: Consumer) -> None:
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", exc)


def _now_ms() -> int:
    return int(time.time() * 1000)
