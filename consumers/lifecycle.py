"""Whether a job should still render: its user's cancellation and its deadline, checked where
the render thread can act on them, so that no device time goes to a user who has left.

- At the front of the queue (`ends_in_queue`), before a render starts: a job its user
  canceled ends `canceled`, and one past its deadline (`GenerationRequest.deadline`) ends
  `expired`, neither rendered.
- While it renders (`watch`): after every denoising step, the batch's members are looked up
  in the cancellation book; a canceled one stops the render at that step
  (`CanceledMidRender`). A deadline never stops a render that has started.
- Once its result is sent, nothing changes: a later cancellation finds nothing to stop.

Cancellations come from the `CancelBook`, which honours only the request's own user's.
The same step hook tells watchers the job's progress (`imagegen.consumers.progress`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from imagegen.consumers.jobs import Job
from imagegen.consumers.progress import JobEvents
from imagegen.consumers.rendering import OnStep, RenderStopped
from imagegen.infra.settings import Settings
from imagegen.schemas import CancelRequest, GenerationRequest, Status
from imagegen.schemas.fields import utc_now

#: Where a job ended early, as `imagegen_jobs_ended_early_total` labels it.
Where = Literal["queue", "render"]

#: A request's honoured cancellation, or None (`CancelBook.honoured`).
Cancellations = Callable[[GenerationRequest], CancelRequest | None]


class CanceledMidRender(RenderStopped):
    """A render stopped after `step` of `steps`, because `jobs` of its batch were canceled."""

    def __init__(self, step: int, steps: int, jobs: list[Job]) -> None:
        super().__init__(step, steps)
        self.jobs = jobs


@dataclass(frozen=True)
class Lifecycle:
    """What the render thread asks about a job on its way. The defaults, for a pipeline used
    alone: nothing is canceled, deadlines are the settings' default, and nobody is told."""

    cancellation: Cancellations = lambda _request: None
    default_ttl_s: float = Settings.model_fields["default_ttl_s"].default
    events: JobEvents | None = None

    def ends_in_queue(self, job: Job) -> tuple[Status, str] | None:
        """How a job at the front of the queue ends instead of rendering, with why; None
        when it renders."""
        if self.cancellation(job.request) is not None:
            return Status.CANCELED, "canceled by its user before its render started"
        deadline = job.request.deadline(self.default_ttl_s)
        if utc_now() >= deadline:
            return Status.EXPIRED, f"its deadline, {deadline.isoformat()}, passed in the queue"
        return None

    def started(self, batch: Sequence[Job], started_ms: int) -> None:
        """Note that `batch` began rendering; tell of the jobs that had not begun before."""
        for job in batch:
            if job.render_started_ms is None:
                job.render_started_ms = started_ms
                if self.events is not None:
                    self.events.started(job)

    def watch(self, batch: Sequence[Job]) -> OnStep:
        """The step hook of a render of `batch`: tells progress, stops for cancellations."""

        def on_step(step: int, steps: int) -> None:
            if self.events is not None:
                for job in batch:
                    self.events.progress(job, step, steps)
            canceled = [job for job in batch if self.cancellation(job.request) is not None]
            if canceled:
                raise CanceledMidRender(step, steps, canceled)

        return on_step
