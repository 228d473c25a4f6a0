"""What the worker tells watchers about a job on `imagegen.events`, keyed by request_id:
`started` when its render begins, `progress` as its steps go by, `finished` with its result.

Events are for watching, and the result stays the one answer:
- `started` and `progress` go out once, best effort (`Outbox.notify`). One the broker does
  not take is counted in `imagegen_events_unsent_total` and logged; it never fails the
  request nor stops the worker, and never waits for room in the producer's queue, so the
  render thread that sends them never waits either.
- `finished` goes in the result's own `Outbox.sending` block (`finished`), so it is sent at
  least once, as the result is, and after the job's last `progress`: all of a job's events
  share its key, so one partition, in the order the one producer sent them.

`progress` is throttled per job (`ProgressThrottle`): at most one every half second, and
always the last step. A job's steps only ever go up: a job rendered again (its batch was
stopped for another member's cancellation) tells no step it told before.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagegen.infra.metrics import EVENTS_UNSENT
from imagegen.schemas import GenerationResult, JobEvent, encode
from imagegen.schemas.events import EventType
from imagegen.schemas.fields import utc_now
from imagegen.schemas.requests import WebhookEvent
from imagegen.schemas.topics import EVENTS

if TYPE_CHECKING:  # jobs.py holds a throttle per job, and the outbox imports jobs.py
    from imagegen.consumers.jobs import Job
    from imagegen.consumers.outbox import Outbox, Sends

log = logging.getLogger(__name__)

#: The shortest time between two `progress` events of one job, but for its last step.
PROGRESS_INTERVAL_S = 0.5


@dataclass
class ProgressThrottle:
    """Which of one job's steps are worth an event. Used by one thread at a time."""

    interval_s: float = PROGRESS_INTERVAL_S
    told: int = 0  # the last step told
    told_at: float = -math.inf  # when, in monotonic seconds

    def due(self, step: int, steps: int, now: float) -> bool:
        """Whether to tell `step` of `steps` at `now`; a step it says yes to counts as told."""
        if step <= self.told:
            return False
        if step < steps and now - self.told_at < self.interval_s:
            return False
        self.told, self.told_at = step, now
        return True


class JobEvents:
    def __init__(
        self, outbox: Outbox, worker_id: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._outbox = outbox
        self._worker_id = worker_id
        self._clock = clock

    def started(self, job: Job) -> None:
        # Carries the request for any webhook: the deliverer learns the start time from it,
        # which every later document of the job shows.
        self._notify(self._event(job, EventType.STARTED, "status", "progress", "completed"))

    def progress(self, job: Job, step: int, steps: int) -> None:
        if job.progress.due(step, steps, self._clock()):
            self._notify(self._event(job, EventType.PROGRESS, "progress", step=step, steps=steps))

    def finished(self, sends: Sends, job: Job, result: GenerationResult) -> None:
        """Send the `finished` event in the block that sends the job's result."""
        event = self._event(job, EventType.FINISHED, "completed", status=result.status)
        if event.request is not None:
            event = event.model_copy(update={"result": result})
        sends.send(EVENTS, event.kafka_key, encode(event))

    def _event(
        self, job: Job, type_: EventType, *webhook_events: WebhookEvent, **fields: object
    ) -> JobEvent:
        """With the request on it where the request's webhook is sent on `webhook_events`."""
        request = job.request
        hooked = any(request.webhook_wants(wanted) for wanted in webhook_events)
        return JobEvent.model_validate(
            {
                "request_id": request.request_id,
                "user_id": request.user_id,
                "type": type_,
                "at": utc_now(),
                "worker_id": self._worker_id,
                "request": request if hooked else None,
                **fields,
            }
        )

    def _notify(self, event: JobEvent) -> None:
        def unsent(why: str) -> None:
            EVENTS_UNSENT.inc()
            log.warning(
                "a %s event of %s was not sent: %s",
                event.type.value,
                event.request_id,
                why,
                extra={"request_id": event.request_id},
            )

        self._outbox.notify(EVENTS, event.kafka_key, encode(event), unsent)
