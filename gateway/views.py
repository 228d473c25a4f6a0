"""The Job, as the HTTP API shows it: the stored request, the latest result, and what the
event hub saw of it meanwhile.

Status comes from the result when there is one (succeeded, failed, rejected, canceled,
expired; the caller resolves a `duplicate` to the result of the job it duplicates), else
`running` once a worker started it, else `queued`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel

from imagegen.gateway.hub import LiveState
from imagegen.schemas import GenerationRequest, GenerationResult, OutputFormat, Priority, Status
from imagegen.schemas.fields import UtcDatetime
from imagegen.schemas.requests import Task

JobStatus = Literal["queued", "running", "succeeded", "failed", "rejected", "canceled", "expired"]
#: The statuses after which nothing changes.
ENDED = frozenset({"succeeded", "failed", "rejected", "canceled", "expired"})
_FROM_RESULT: dict[Status, JobStatus] = {
    Status.SUCCEEDED: "succeeded",
    Status.FAILED: "failed",
    Status.REJECTED: "rejected",
    Status.CANCELED: "canceled",
    Status.EXPIRED: "expired",
}


class JobRequest(BaseModel):
    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int | None
    output_format: OutputFormat
    task: Task = "generate"
    image: str | None = None
    mask: str | None = None
    strength: float | None = None


class JobProgress(BaseModel):
    step: int
    steps: int


class JobImage(BaseModel):
    url: str
    url_expires_at: UtcDatetime
    content_type: str
    sha256: str
    size_bytes: int
    width: int | None
    height: int | None
    seed: int | None
    device_ms: float | None


class JobError(BaseModel):
    reason: str | None
    detail: str | None
    retry_after_ms: int | None


class Job(BaseModel):
    id: str
    status: JobStatus
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    expires_at: UtcDatetime | None
    priority: Priority
    request: JobRequest
    progress: JobProgress | None
    queue_position: int | None
    estimated_start_at: UtcDatetime | None
    result: JobImage | None
    error: JobError | None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


class JobPage(BaseModel):
    data: list[Job]
    next_cursor: str | None


#: Signs an image URL for a succeeded result.
UrlSigner = Callable[[GenerationResult], str]


def job_view(
    request: GenerationRequest,
    result: GenerationResult | None,
    live: LiveState | None,
    sign: UrlSigner,
    url_ttl_s: int,
    now: datetime,
) -> Job:
    """The Job of `request`. (Its `created_at` is the request's `submitted_at`, as in the
    stored `JobRecord`: the webhook deliverer, which has no record, shows the same.)"""
    live = live or LiveState()
    status: JobStatus
    if result is not None:
        if result.status not in _FROM_RESULT:
            raise ValueError(f"resolve the {result.status} result of {result.request_id} first")
        status = _FROM_RESULT[result.status]
    elif live.running:
        status = "running"
    else:
        status = "queued"
    ended = result is not None
    progress = (
        JobProgress(step=live.step, steps=live.steps)
        if not ended and live.step is not None and live.steps is not None
        else None
    )
    return Job(
        id=request.request_id,
        status=status,
        created_at=request.submitted_at,
        started_at=live.started_at,
        finished_at=result.completed_at if result is not None else None,
        expires_at=request.expires_at,
        priority=request.priority,
        request=JobRequest(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            model=request.model,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed,
            output_format=request.output_format,
            task=request.task,
            image=request.image,
            mask=request.mask,
            strength=request.edit_strength,
        ),
        progress=progress,
        queue_position=None if ended or live.running else live.queue_position,
        estimated_start_at=None if ended or live.running else live.estimated_start_at,
        result=_image(result, sign, url_ttl_s, now),
        error=_error(result),
    )


def _image(
    result: GenerationResult | None, sign: UrlSigner, url_ttl_s: int, now: datetime
) -> JobImage | None:
    if result is None or result.status is not Status.SUCCEEDED:
        return None
    assert result.content_type is not None and result.sha256 is not None
    assert result.size_bytes is not None
    return JobImage(
        url=sign(result),
        url_expires_at=now + timedelta(seconds=url_ttl_s),
        content_type=result.content_type,
        sha256=result.sha256,
        size_bytes=result.size_bytes,
        width=result.width,
        height=result.height,
        seed=result.seed,
        device_ms=result.device_ms,
    )


def _error(result: GenerationResult | None) -> JobError | None:
    if result is None or result.status is Status.SUCCEEDED:
        return None
    return JobError(
        reason=None if result.reason is None else result.reason.value,
        detail=result.detail,
        retry_after_ms=result.retry_after_ms,
    )
