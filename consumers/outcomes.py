"""How a record of `imagegen.render` or `imagegen.render.batch` ends: a result for the user
(with the job's `finished` event, `imagegen.consumers.progress`) and, when it failed, a dead
letter for operators, sent through the outbox for the record's offset. A job canceled by its
user or past its deadline ends `canceled` or `expired`: not a failure, so no dead letter.

The outbox retries whatever cannot be written, and stops the worker if it still cannot be,
before the offset is stored (`imagegen.consumers.outbox`): a result or a dead letter is
never lost, so the record is finished only once both of a failure's records are
acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Message

from imagegen.consumers.crashes import CrashLedger
from imagegen.consumers.inputs import InvalidInputImage
from imagegen.consumers.jobs import Job, Polled, consumed_headers, now_ms
from imagegen.consumers.lifecycle import Where
from imagegen.consumers.models import UnknownModel
from imagegen.consumers.outbox import Outbox, Sends
from imagegen.consumers.progress import JobEvents
from imagegen.consumers.rendering import seed_for
from imagegen.consumers.storage import StoredImage
from imagegen.infra.dead_letter_spill import fits, spill
from imagegen.infra.metrics import DLQ_RECORDS, JOBS_ENDED_EARLY
from imagegen.infra.object_store import ObjectStore
from imagegen.schemas import (
    DeadLetter,
    GenerationResult,
    Reason,
    Stage,
    Status,
    Timings,
    encode,
)
from imagegen.schemas.fields import utc_now
from imagegen.schemas.results import task_fields
from imagegen.schemas.topics import DLQ, RESULTS, WORKER_GROUPS

log = logging.getLogger(__name__)

#: The one reason of each early end.
_EARLY_REASONS = {Status.CANCELED: Reason.CANCELED, Status.EXPIRED: Reason.DEADLINE_EXCEEDED}
_WHERE: dict[Where, str] = {"queue": "in the queue", "render": "mid-render"}


class Outcomes:
    """Publishes how jobs ended. Thread-safe."""

    def __init__(
        self,
        outbox: Outbox,
        crashes: CrashLedger,
        store: ObjectStore,
        worker_id: str,
        events: JobEvents | None,
    ) -> None:
        """`events` sends each job's `finished` event with its result; without it, results
        and dead letters go alone."""
        self._outbox = outbox
        self._crashes = crashes
        self._store = store  # also where a letter too large to send keeps its original
        self._bucket = store.bucket
        self._worker_id = worker_id
        self._events = events

    def succeeded(
        self, job: Job, stored: StoredImage, attempts: int, batch_size: int | None
    ) -> None:
        """The job's image is `stored`: tell the user where. `batch_size` is None when an
        earlier attempt stored it (and the job has no `device_ms`: this one rendered none)."""
        request = job.request
        result = GenerationResult(
            request_id=request.request_id,
            user_id=request.user_id,
            status=Status.SUCCEEDED,
            bucket=self._bucket,
            object_key=stored.key,
            content_type=stored.content_type,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            width=request.width,
            height=request.height,
            model=request.model,
            seed=seed_for(request),
            steps=request.steps,
            **task_fields(request),
            batch_size=batch_size,
            timings=_timings(job),
            device_ms=job.device_ms,
            attempts=attempts,
            worker_id=self._worker_id,
            completed_at=utc_now(),
        )
        job.span.set_attribute("imagegen.attempts", attempts)
        with self._outbox.sending(job.polled) as sends:
            self._send_result(sends, job, result)
        log.info(
            "%s succeeded: %s (%d bytes, %d attempt(s))",
            request.request_id,
            stored.key,
            stored.size_bytes,
            attempts,
        )

    def failed(self, job: Job, error: BaseException, stage: Stage, attempts: int) -> None:
        """A failed result for the user and a dead letter for operators."""
        with job.log_context():
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
            **task_fields(job.request),
            attempts=attempts,
            worker_id=self._worker_id,
            completed_at=utc_now(),
        )
        with self._outbox.sending(job.polled) as sends:
            self._send_result(sends, job, result)
            self._dead_letter(sends, job.message, error, stage, job, attempts)

    def ended_early(self, job: Job, status: Status, where: Where, detail: str) -> None:
        """A `canceled` or `expired` result: the job ended in the queue or mid-render, as
        its user wished or its deadline required."""
        log.info("%s %s %s: %s", job.request.request_id, status.value, _WHERE[where], detail)
        result = GenerationResult(
            request_id=job.request.request_id,
            user_id=job.request.user_id,
            status=status,
            reason=_EARLY_REASONS[status],
            detail=detail,
            model=job.request.model,
            **task_fields(job.request),
            timings=_timings(job),
            device_ms=job.device_ms,
            attempts=int(where == "render"),
            worker_id=self._worker_id,
            completed_at=utc_now(),
        )
        with self._outbox.sending(job.polled) as sends:
            # Marks that dead processes left serve no purpose once the record is answered.
            self._send_result(sends, job, result, lambda: self._crashes.forget(job.record))
        JOBS_ENDED_EARLY.labels(status.value, where).inc()

    def unreadable(self, message: Message, polled: Polled, error: BaseException) -> None:
        """A record that holds no request: a dead letter, and no result (it names no user)."""
        with self._outbox.sending(polled) as sends:
            self._dead_letter(sends, message, error, Stage.VALIDATE)

    def _send_result(
        self,
        sends: Sends,
        job: Job,
        result: GenerationResult,
        on_acknowledged: Callable[[], None] | None = None,
    ) -> None:
        sends.send(RESULTS, result.kafka_key, encode(result), job.span.headers, on_acknowledged)
        if self._events is not None:
            self._events.finished(sends, job, result)

    def _dead_letter(
        self,
        sends: Sends,
        message: Message,
        error: BaseException,
        stage: Stage,
        job: Job | None = None,
        attempts: int = 1,
    ) -> None:
        where = sends.polled
        letter = DeadLetter.from_failure(
            error=error,
            stage=stage,
            topic=where.topic,
            partition=where.partition,
            offset=where.offset,
            timestamp_ms=message.timestamp()[1],
            key=message.key(),
            value=message.value(),
            headers=consumed_headers(message),
            attempts=attempts,
            group=WORKER_GROUPS[where.topic],
        )
        if not fits(letter):
            # An exception here leaves the offset unfinished: the record is read again.
            letter = spill(letter, self._store)

        def delivered() -> None:
            DLQ_RECORDS.labels(stage.value).inc()
            if job is not None:
                self._crashes.forget(job.record)  # the dead letter keeps the record now

        sends.send(DLQ, letter.key, letter.value, letter.headers(), delivered)


def _timings(job: Job) -> Timings:
    started_ms = job.render_started_ms
    submitted_ms = job.request.submitted_at.timestamp() * 1000
    return Timings(
        queue_ms=max(0.0, started_ms - job.admitted_at_ms) if started_ms else None,
        render_ms=job.timings.get("render_ms"),
        encode_ms=job.timings.get("encode_ms"),
        upload_ms=job.timings.get("upload_ms"),
        total_ms=max(0.0, now_ms() - submitted_ms),
    )


def _reason(error: BaseException, stage: Stage) -> Reason:
    if isinstance(error, UnknownModel):
        return Reason.UNKNOWN_MODEL
    if isinstance(error, InvalidInputImage):
        return Reason.INVALID_INPUT_IMAGE
    return Reason.RENDER_ERROR if stage is Stage.RENDER else Reason.STORE_ERROR
