"""What the API returns, as typed objects. Unknown fields are kept out of the way rather than
refused, so that a newer gateway does not break an older client."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

JobStatus = Literal["queued", "running", "succeeded", "failed", "rejected", "canceled", "expired"]
#: The statuses a job never leaves.
ENDED = frozenset({"succeeded", "failed", "rejected", "canceled", "expired"})


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class JobProgress(_Answer):
    step: int
    steps: int


class JobImage(_Answer):
    url: str
    url_expires_at: datetime
    content_type: str
    sha256: str
    size_bytes: int
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    device_ms: float | None = None


class JobError(_Answer):
    reason: str | None = None
    detail: str | None = None
    retry_after_ms: int | None = None


class Job(_Answer):
    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    priority: str = "interactive"
    request: dict[str, Any] = {}
    progress: JobProgress | None = None
    queue_position: int | None = None
    estimated_start_at: datetime | None = None
    result: JobImage | None = None
    error: JobError | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


class JobPage(_Answer):
    data: list[Job]
    next_cursor: str | None = None


class ServerEvent(_Answer):
    """One event of a job's stream: `status` and `completed` carry the Job, `progress` the
    step. `id` is what a reconnect sends as Last-Event-ID."""

    event: str
    id: str | None
    data: dict[str, Any]

    @property
    def job(self) -> Job | None:
        return Job.model_validate(self.data) if self.event in ("status", "completed") else None

    @property
    def progress(self) -> JobProgress | None:
        return JobProgress.model_validate(self.data) if self.event == "progress" else None
