"""The HTTP API's routes: submit (a generation, or an edit as multipart: `gateway.edits`),
presigned uploads (`gateway.uploads`), read, list, cancel, the image, the event stream, and
the health, readiness and metrics of the instance.

`create_app(settings)` builds the FastAPI app; its lifespan starts the instance's services
(`gateway.services`) and stops them on shutdown. Every route but the health ones needs an
API key (`gateway.auth`); every error is a problem (`gateway.problems`). A submission is
answered 202 with the Job and `Location` of the job once the intake decided (or did not
within `IMAGEGEN_GATEWAY_INTAKE_WAIT_S`), or with the problem of the intake's refusal. A
job's events stream at `/events`, and at the job's own URL with `Accept: text/event-stream`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagegen.gateway import page, problems
from imagegen.gateway.dependencies import Svc, User
from imagegen.gateway.edits import EDIT_BODY_LIMIT, EDITS, edit_submission
from imagegen.gateway.events_stream import stream_events, wants_events
from imagegen.gateway.job_store import MAX_PAGE, InvalidCursor
from imagegen.gateway.middleware import BodyLimit, RequestLog
from imagegen.gateway.problems import Problem, unavailable
from imagegen.gateway.services import Services, blocking
from imagegen.gateway.submissions import (
    REJECTIONS,
    Outcome,
    Submission,
    SubmitBody,
    parse_body,
    prefer_wait,
    refuse_private_webhook,
    submit,
)
from imagegen.gateway.uploads import UploadBody, UploadTicket, ticket
from imagegen.gateway.views import Job, JobPage
from imagegen.infra.settings import Settings
from imagegen.schemas import Reason
from imagegen.schemas.errors import BrokerUnavailable, PublishError

JOBS = "/v1/images/jobs"
#: What a submission, a generation or an edit, may be answered.
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "With `Prefer: wait=N`: the job ended within N seconds."},
    **problems.responses(
        "invalid-request",
        "idempotency-key-mismatch",
        "exceeds-burst",
        "unknown-model",
        "deadline-exceeded",
        "body-too-large",
        "rate-limited",
        "overloaded",
        "canceled",
    ),
}


def _json(
    model: Job | JobPage, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(model.model_dump(mode="json"), status, headers=headers)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await Services.start(settings)
        try:
            yield
        finally:
            await app.state.services.close()

    app = FastAPI(
        title="imagegen gateway",
        summary="Submit image generations, follow them, and fetch the images.",
        version="1",
        lifespan=lifespan,
    )
    problems.install(app)
    page.install(app)  # the web page at /, and its assets: no key needed
    app.add_middleware(
        BodyLimit,
        limit_bytes=settings.gateway_max_body_bytes,
        route_limits={EDITS: EDIT_BODY_LIMIT},
    )
    app.add_middleware(RequestLog)

    @app.post(
        "/v1/images/generations",
        status_code=202,
        response_model=Job,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SubmitBody.model_json_schema()}},
            }
        },
        responses=SUBMIT_RESPONSES,
    )
    async def create_generation(
        request: Request,
        user: User,
        services: Svc,
        idempotency_key: Annotated[str | None, Header()] = None,
        prefer: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Submit one image generation: 202 and the queued Job, with its `Location`."""
        submission = parse_body(
            await request.body(),
            user,
            idempotency_key,
            settings.default_ttl_s,
            settings.webhook_allow_private,
        )
        return await _submitted(services, submission, prefer)

    @app.post(
        EDITS,
        status_code=202,
        response_model=Job,
        responses=SUBMIT_RESPONSES,
    )
    async def create_edit(
        request: Request,
        user: User,
        services: Svc,
        idempotency_key: Annotated[str | None, Header()] = None,
        prefer: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Submit an edit (multipart: `image`, optional `mask`, `prompt`, the options): as
        a generation, 202 and the queued Job."""
        submission = await edit_submission(request, user, services, idempotency_key)
        return await _submitted(services, submission, prefer)

    @app.post(
        "/v1/uploads",
        status_code=201,
        response_model=UploadTicket,
        responses=problems.responses("invalid-request"),
    )
    async def create_upload(body: UploadBody, user: User, services: Svc) -> UploadTicket:
        """A presigned PUT for an input image or mask of yours: PUT the file's bytes to
        `url` with `headers`, then name `key` as `image` or `mask`."""
        return await ticket(services, user, body)

    @app.get(JOBS, response_model=JobPage, responses=problems.responses("invalid-request"))
    async def list_jobs(
        user: User,
        services: Svc,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
        cursor: str | None = None,
    ) -> Response:
        """The user's jobs, newest first; pass `next_cursor` back for the next page."""
        try:
            ids, next_cursor = await blocking(services.jobs.list_jobs, user, limit, cursor)
        except InvalidCursor as exc:
            raise Problem(
                "invalid-request", str(exc), errors=[{"loc": ["query", "cursor"], "msg": str(exc)}]
            ) from exc
        records = await asyncio.gather(*(blocking(services.jobs.job, i) for i in ids))
        jobs = await asyncio.gather(*(services.view(r) for r in records if r is not None))
        return _json(JobPage(data=list(jobs), next_cursor=next_cursor))

    @app.get(
        JOBS + "/{job_id}",
        response_model=Job,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "The Job; with `Accept: text/event-stream`, its events.",
            },
            **problems.responses("not-found"),
        },
    )
    async def get_job(
        job_id: str,
        user: User,
        services: Svc,
        accept: Annotated[str | None, Header()] = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """One job of the user's; with `Accept: text/event-stream`, its event stream, as
        at `/events` (the way Cog streams a prediction)."""
        record = await services.record(job_id, user)
        if wants_events(accept):
            return await stream_events(services, record, last_event_id)
        return _json(await services.view(record))

    @app.get(
        JOBS + "/{job_id}/image",
        status_code=307,
        response_class=RedirectResponse,
        responses=problems.responses("not-found", "image-not-ready"),
    )
    async def get_image(job_id: str, user: User, services: Svc) -> Response:
        """307 to a presigned URL of the image, fresh on every call."""
        record = await services.record(job_id, user)
        result = await services.result(job_id)
        if result is None or result.object_key is None:
            job = await services.view(record)
            raise Problem(
                "image-not-ready",
                f"job {job_id} is {job.status}: only a succeeded job has an image",
                job_id=job_id,
                job=job.model_dump(mode="json"),
            )
        return RedirectResponse(services.sign(result), status_code=307)

    @app.post(
        JOBS + "/{job_id}/cancel",
        status_code=202,
        response_model=Job,
        responses=problems.responses("not-found", "job-ended"),
    )
    async def cancel_job(job_id: str, user: User, services: Svc) -> Response:
        """Ask the job to stop: 202; its result says `canceled` if the ask landed in time."""
        record = await services.record(job_id, user)
        job = await services.view(record)
        if job.ended:
            raise Problem(
                "job-ended",
                f"job {job_id} already ended {job.status}: there is nothing to cancel",
                job_id=job_id,
                job=job.model_dump(mode="json"),
            )
        await _cancel(services, job_id, user)
        return _json(job, 202)

    @app.get(
        JOBS + "/{job_id}/events",
        response_class=Response,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."},
            **problems.responses("not-found"),
        },
    )
    async def job_events(
        job_id: str,
        user: User,
        services: Svc,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The job's events as server-sent events: `status`, `progress`, then `completed`."""
        record = await services.record(job_id, user)
        return await stream_events(services, record, last_event_id)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        """200 while the process runs."""
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse, responses=problems.responses())
    async def readyz(request: Request) -> str:
        """200 once the key book, the event hub and the job indexer run and caught up."""
        services: Services | None = getattr(request.app.state, "services", None)
        waiting = ["starting"] if services is None else services.unready()
        if waiting:
            raise Problem("unavailable", "not ready: " + "; ".join(waiting))
        return "ready"

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics of this instance."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _submitted(services: Services, submission: Submission, prefer: str | None) -> Response:
    """A checked submission published, and answered as its intake decided."""
    allow_private = services.settings.webhook_allow_private
    await refuse_private_webhook(submission.request, allow_private)
    wait_s = prefer_wait(prefer)
    return _answer(await submit(services, submission, wait_s), wait_s)


async def _cancel(services: Services, job_id: str, user: str) -> None:
    try:
        await services.publisher.cancel(job_id, user)
    except (BrokerUnavailable, PublishError) as exc:
        raise unavailable(f"{exc}; the cancellation was not sent, try again") from exc


def _answer(outcome: Outcome, wait_s: float | None) -> Response:
    job = outcome.job
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    refused = job.status == "rejected" or (
        job.status in ("canceled", "expired") and not outcome.admitted
    )
    if refused and job.error is not None and job.error.reason is not None:
        slug = REJECTIONS.get(Reason(job.error.reason))
        if slug is not None:
            raise Problem(
                slug,
                job.error.detail or f"the request was {job.status}",
                headers=headers,
                retry_after_ms=job.error.retry_after_ms,
                job_id=job.id,
                job=job.model_dump(mode="json"),
            )
    headers["Location"] = f"{JOBS}/{job.id}"
    if wait_s is not None:
        headers["Preference-Applied"] = f"wait={wait_s:g}"
    return _json(job, 200 if job.ended else 202, headers)
