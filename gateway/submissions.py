"""`POST /v1/images/generations`: from a body to a published request and the intake's decision.

1. The body is checked here, whole, before anything is published: a bad one is 422 with
   every bad field (and a bad Idempotency-Key beside them), and the key decides the user
   (a body naming `user_id` is 422).
2. The request id: with an `Idempotency-Key`, the uuid5 of (user, key), so every instance
   and every retry arrive at the same id, and the job store's `job.json` (first write wins)
   tells a replay; without one, a new ULID.
3. A replay with the same body (the sha256 of its validated fields, defaults filled in:
   `body_sha256`) is the stored job; when that has no result yet it is published again,
   which the processor drops as a publish retry of an admitted request, or admits when the
   first never arrived. Another body is 422 `idempotency-key-mismatch`.
4. Otherwise it is published (acks=all) while the event hub watches for the decision: an
   `admitted`, `started` or `progress` event, or a result. The job is stored once decided,
   or once `gateway_intake_wait_s` passed without a decision (it is queued then), and
   before the answer: a client that reads the answer can read the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from imagegen.gateway.hub import Watch
from imagegen.gateway.job_store import JobRecord
from imagegen.gateway.problems import Problem, unavailable
from imagegen.gateway.services import Services, blocking
from imagegen.gateway.views import Job
from imagegen.infra.webhook_targets import (
    WebhookTargetRefused,
    WebhookTargetUnresolvable,
    check_url,
    resolve,
)
from imagegen.schemas import GenerationRequest, OutputFormat, Priority, Reason
from imagegen.schemas.errors import BrokerUnavailable, InvalidMessage, PublishError
from imagegen.schemas.fields import IDEMPOTENCY_KEY_PATTERN, PATTERN_HELP, UtcDatetime, utc_now
from imagegen.schemas.requests import Task, WebhookEvent
from imagegen.schemas.uploads import foreign_inputs, user_prefix

#: The namespace of request ids made from idempotency keys (uuid5): fixed forever.
IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0e4d4e-8a8f-4d8e-9a43-51f1f2a0c6b1")
MAX_WAIT_S = 60.0
_REQUEST_FIELDS = (
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "output_format",
    "priority",
    "expires_at",
    "webhook_url",
    "webhook_events",
    "task",
    "image",
    "mask",
    "strength",
)


class SubmitBody(BaseModel):
    """The body of a submission (for the API description; `parse_body` checks it against
    the request contract itself)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=2000)
    negative_prompt: str | None = Field(default=None, max_length=2000)
    model: str = "tiny"
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(default=25, ge=1, le=100)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    output_format: OutputFormat = "png"
    priority: Priority = "interactive"
    ttl_s: float | None = Field(default=None, gt=0, description="Expire this long from now.")
    expires_at: UtcDatetime | None = Field(default=None, description="Or expire at this time.")
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="An https URL to POST the job to (signed: see the README's Webhooks).",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None, description="Which events to POST on; when absent, `completed` only."
    )
    task: Task = "generate"
    image: str | None = Field(
        default=None, description="edit and inpaint: the key of an upload of yours."
    )
    mask: str | None = Field(
        default=None, description="inpaint: the key of an upload of yours; white is repainted."
    )
    strength: float | None = Field(
        default=None, gt=0, le=1, description="edit and inpaint: 0 < s <= 1; when absent, 0.8."
    )


_ALLOWED = frozenset(SubmitBody.model_fields)


@dataclass(frozen=True)
class Submission:
    request: GenerationRequest
    body_sha256: str


#: Where a bad part of a submission is: ("body", field) or ("header", name).
Loc = tuple[str, ...]


def invalid(errors: list[tuple[Loc, str]]) -> Problem:
    listed = [{"loc": list(loc), "msg": msg} for loc, msg in errors]
    summary = "; ".join(f"{'.'.join(loc[1:]) or loc[0]}: {msg}" for loc, msg in errors)
    return Problem("invalid-request", summary, errors=listed)


def parse_body(
    raw: bytes,
    user_id: str,
    idempotency_key: str | None,
    default_ttl_s: float,
    allow_private_webhooks: bool = False,
) -> Submission:
    """The request a body asks for, as `user_id`; raises the 422 problem naming every bad
    field, and a bad Idempotency-Key beside them."""
    header_errors = _key_errors(idempotency_key)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid([*header_errors, (("body",), f"not valid UTF-8 JSON ({exc})")]) from None
    if not isinstance(body, dict):
        raise invalid([*header_errors, (("body",), "must be a JSON object")])
    errors = [*header_errors, *_unknown_fields(body)]
    now = utc_now()
    fields: dict[str, Any] = {name: body[name] for name in _REQUEST_FIELDS if name in body}
    deadline, deadline_errors = _deadline(body, now, default_ttl_s)
    errors.extend(deadline_errors)
    fields.update(deadline)
    if idempotency_key is not None and not header_errors:
        fields["idempotency_key"] = idempotency_key
        fields["request_id"] = str(
            uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{user_id}\x1f{idempotency_key}")
        )
    try:
        request = GenerationRequest.new(user_id=user_id, submitted_at=now, **fields)
    except InvalidMessage as exc:
        errors.extend((("body", *filter(None, [field])), msg) for field, msg in exc.problems)
        raise invalid(errors) from None
    errors.extend(_webhook_errors(request, allow_private_webhooks))
    errors.extend(_input_errors(request))
    if errors:
        raise invalid(errors)
    return Submission(request, body_sha256(request, body, default_ttl_s))


def _webhook_errors(request: GenerationRequest, allow_private: bool) -> list[tuple[Loc, str]]:
    if request.webhook_url is None:
        return []
    try:
        check_url(request.webhook_url, allow_private)
    except WebhookTargetRefused as refused:
        return [(("body", "webhook_url"), str(refused))]
    return []


def _input_errors(request: GenerationRequest) -> list[tuple[Loc, str]]:
    foreign = foreign_inputs(request.user_id, request.inputs)
    own = user_prefix(request.user_id)
    return [
        (("body", name), f"must be an upload of yours, under {own} (POST /v1/uploads)")
        for name in ("image", "mask")
        if getattr(request, name) in foreign
    ]


async def refuse_private_webhook(request: GenerationRequest, allow_private: bool) -> None:
    """422 for a webhook_url whose name resolves to an address deliveries never go to.
    A name that does not resolve now passes: the deliverer resolves it at every attempt
    (and refuses it then, should it point inside the network)."""
    if request.webhook_url is None or allow_private:
        return
    try:
        await asyncio.to_thread(resolve, request.webhook_url, allow_private)
    except WebhookTargetRefused as refused:
        raise invalid([(("body", "webhook_url"), str(refused))]) from None
    except WebhookTargetUnresolvable:
        return


def _key_errors(idempotency_key: str | None) -> list[tuple[Loc, str]]:
    if idempotency_key is None or IDEMPOTENCY_KEY_PATTERN.search(idempotency_key):
        return []
    return [(("header", "Idempotency-Key"), PATTERN_HELP[IDEMPOTENCY_KEY_PATTERN.pattern])]


def _unknown_fields(body: dict[str, Any]) -> list[tuple[Loc, str]]:
    return [
        (
            ("body", name),
            "not allowed: your API key decides the user"
            if name == "user_id"
            else f"unknown field (allowed: {', '.join(sorted(_ALLOWED))})",
        )
        for name in body
        if name not in _ALLOWED
    ]


def _deadline(
    body: dict[str, Any], now: datetime, default_ttl_s: float
) -> tuple[dict[str, datetime], list[tuple[Loc, str]]]:
    """The `expires_at` that `ttl_s` (or its absence) asks for, or the errors of `ttl_s`;
    nothing when the body gives `expires_at` itself."""
    ttl_s = body.get("ttl_s")
    if ttl_s is None:
        given = "expires_at" in body
        return ({} if given else {"expires_at": now + timedelta(seconds=default_ttl_s)}), []
    if "expires_at" in body:
        return {}, [(("body", "ttl_s"), "give ttl_s or expires_at, not both")]
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not ttl_s > 0:
        return {}, [(("body", "ttl_s"), "must be a number of seconds greater than 0")]
    if not math.isfinite(ttl_s) or ttl_s > 365 * 86_400:
        return {}, [(("body", "ttl_s"), "must be at most a year (31536000 seconds)")]
    return {"expires_at": now + timedelta(seconds=ttl_s)}, []


def body_sha256(request: GenerationRequest, body: dict[str, Any], default_ttl_s: float) -> str:
    """The sha256 of what the body asks for, as validated, so that a body that spells out
    a default (`"steps": 25`) is the same as one that leaves it out.

    The deadline counts as asked, not as resolved: a replay resolves `ttl_s` against a
    later now, and must still match. An absent `ttl_s` is the default one.
    """
    asked = request.model_dump(mode="json", include=set(_REQUEST_FIELDS) - {"expires_at"})
    if request.webhook_url is not None:  # no events named: `completed`, the default
        asked["webhook_events"] = sorted(request.webhook_events or ["completed"])
    if "expires_at" in body:
        asked["expires_at"] = request.model_dump(mode="json", include={"expires_at"})["expires_at"]
    else:
        asked["ttl_s"] = float(body.get("ttl_s") or default_ttl_s)
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def prefer_wait(prefer: str | None) -> float | None:
    """The `wait=N` of a Prefer header (0 < N <= 60), or None; other preferences are ignored."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            return None
        return seconds if 0 < seconds <= MAX_WAIT_S and math.isfinite(seconds) else None
    return None


@dataclass(frozen=True)
class Outcome:
    job: Job
    replayed: bool
    #: Whether the intake admitted it: an end after admission is the job's own, not the
    #: intake's answer to the submission.
    admitted: bool


async def submit(services: Services, submission: Submission, wait_s: float | None) -> Outcome:
    """Publish the submission (or find its replay) and return the job once decided."""
    request = submission.request
    if request.idempotency_key is not None:
        stored = await blocking(services.jobs.job, request.request_id)
        if stored is not None:
            if stored.body_sha256 != submission.body_sha256:
                raise _mismatch(request, stored)
            job = await _attach(services, stored, wait_s)
            return Outcome(job, replayed=True, admitted=job.status != "rejected")
    with services.hub.watch(request.request_id) as watch:
        await _publish(services, request)
        deadline = time.monotonic() + services.settings.gateway_intake_wait_s
        while not ((state := watch.state()) is not None and state.decided):
            if not await watch.changed(deadline - time.monotonic()):
                break
        admitted = state is not None and (state.admitted or state.running)
        record = JobRecord(
            request=request, created_at=request.submitted_at, body_sha256=submission.body_sha256
        )
        stored = await blocking(services.jobs.put_job, record)
        if stored.body_sha256 != submission.body_sha256:  # a concurrent first use of the key
            raise _mismatch(request, stored)
        job = await services.view(stored)
        if wait_s is not None and job.status in ("queued", "running"):
            job = await _hold(services, stored, watch, wait_s)
    return Outcome(job, replayed=False, admitted=admitted)


def _mismatch(request: GenerationRequest, stored: JobRecord) -> Problem:
    return Problem(
        "idempotency-key-mismatch",
        f"Idempotency-Key {request.idempotency_key!r} was used for job "
        f"{stored.request.request_id} with another body: use a new key for a new request",
        job_id=stored.request.request_id,
    )


async def _attach(services: Services, stored: JobRecord, wait_s: float | None) -> Job:
    """A replay: the stored job, published again while it has no result, or when its
    result is a refusal that waiting cures (rate limited, overloaded): the retry the
    refusal asked for, under the same id. (A gateway that never saw the retry's events
    shows the refusal until the retry's result is indexed.)"""
    request_id = stored.request.request_id
    with services.hub.watch(request_id) as watch:
        result = await services.result(request_id)
        if result is None or result.reason in RETRIED:
            before = watch.state()
            await _publish(services, stored.request)
            if result is not None:  # the retry's decision, not the refusal seen before
                deadline = time.monotonic() + services.settings.gateway_intake_wait_s
                while watch.state() is before:
                    if not await watch.changed(deadline - time.monotonic()):
                        break
        job = await services.view(stored)
        if wait_s is not None and not job.ended:
            job = await _hold(services, stored, watch, wait_s)
    return job


async def _hold(services: Services, stored: JobRecord, watch: Watch, wait_s: float) -> Job:
    """`Prefer: wait`: until the job has a result or `wait_s` passed."""
    deadline = time.monotonic() + wait_s
    while not ((state := watch.state()) is not None and state.result is not None):
        if not await watch.changed(deadline - time.monotonic()):
            break
    return await services.view(stored)


async def _publish(services: Services, request: GenerationRequest) -> None:
    try:
        await services.publisher.publish(request)
    except (BrokerUnavailable, PublishError) as exc:
        raise unavailable(f"{exc}; nothing was submitted, try again") from exc


#: The refusals that a replay of the same submission retries.
RETRIED = frozenset({Reason.RATE_LIMITED, Reason.OVERLOADED})
#: The problem a result's reason answers a submission with (admitted jobs are 202).
REJECTIONS = {
    Reason.RATE_LIMITED: "rate-limited",
    Reason.OVERLOADED: "overloaded",
    Reason.EXCEEDS_BURST: "exceeds-burst",
    Reason.INVALID_REQUEST: "invalid-request",
    Reason.UNKNOWN_MODEL: "unknown-model",
    Reason.DEADLINE_EXCEEDED: "deadline-exceeded",
    Reason.CANCELED: "canceled",
}
