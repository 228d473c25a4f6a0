"""`GET /v1/images/jobs/{id}/events`, and `GET /v1/images/jobs/{id}` with
`Accept: text/event-stream`: a job's events as server-sent events.

Events: `status` (data: the Job, when it is queued, then when it runs), `progress` (data:
{"step", "steps"}), `completed` (data: the Job; the stream then ends). Every event's `id`
is derived from the job alone, so every instance gives the same one: queued 1, running 2,
progress step k 2 + k, completed 1000. A stream starts with what the job's current state
implies beyond `Last-Event-ID` (the status, the latest progress, or completed), then
follows the event hub; a reconnecting client therefore misses nothing that still matters
and sees nothing twice. Intermediate progress steps are not replayed: only the latest.
A `: keep-alive` comment goes out every 15 s of quiet.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from fastapi.responses import StreamingResponse

from imagegen.gateway.job_store import JobRecord
from imagegen.gateway.services import Services
from imagegen.gateway.views import Job

KEEPALIVE_S = 15.0
QUEUED_ID = 1
RUNNING_ID = 2
COMPLETED_ID = 1000
MEDIA_TYPE = "text/event-stream"


def event_id_of_progress(step: int) -> int:
    return RUNNING_ID + step


def implied(job: Job) -> Iterator[tuple[int, str, str]]:
    """(id, event, data) of what `job`'s state implies, in id order."""
    data = job.model_dump_json()
    if job.ended:
        yield COMPLETED_ID, "completed", data
        return
    if job.status == "queued":
        yield QUEUED_ID, "status", data
        return
    yield RUNNING_ID, "status", data
    if job.progress is not None:
        progress = json.dumps({"step": job.progress.step, "steps": job.progress.steps})
        yield event_id_of_progress(job.progress.step), "progress", progress


def wants_events(accept: str | None) -> bool:
    """Whether an Accept header asks for the event stream: it names `text/event-stream`
    without `q=0`. Only an exact name counts: `*/*`, which every HTTP library sends,
    keeps the Job's JSON."""
    for media_range in (accept or "").split(","):
        name, *parameters = (part.strip().lower() for part in media_range.split(";"))
        if name == MEDIA_TYPE and not any(_refused(p) for p in parameters):
            return True
    return False


def _refused(parameter: str) -> bool:
    key, _, value = parameter.partition("=")
    if key.strip() != "q":
        return False
    try:
        return float(value.strip()) == 0
    except ValueError:
        return False


def last_event_id(header: str | None) -> int:
    """The Last-Event-ID a client sent, or 0 (anything that is not a number counts as none)."""
    text = (header or "").strip()
    return int(text) if text.isascii() and text.isdigit() else 0


async def stream_events(
    services: Services, record: JobRecord, last_event: str | None
) -> StreamingResponse:
    return StreamingResponse(
        _events(services, record, last_event_id(last_event)),
        media_type=MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(services: Services, record: JobRecord, after: int) -> AsyncIterator[str]:
    sent = after
    with services.hub.watch(record.request.request_id) as watch:
        while True:
            job = await services.view(record)
            for event_id, name, data in implied(job):
                if event_id > sent:
                    yield f"id: {event_id}\nevent: {name}\ndata: {data}\n\n"
                    sent = event_id
            if job.ended:
                return
            if not await watch.changed(KEEPALIVE_S):
                yield ": keep-alive\n\n"
