"""`imagegen submit`: publish one request from the command line."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from imagegen.cli.results import conclude
from imagegen.cli.times import iso_time
from imagegen.cli.upload import upload_file
from imagegen.cli.watch import wait_with_progress
from imagegen.consumers.events import JobFollower
from imagegen.infra.kafka import check_broker
from imagegen.infra.settings import Settings, load_settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import GenerationRequest, encode
from imagegen.schemas.fields import utc_now

console = Console(soft_wrap=True, highlight=False)


class PriorityChoice(StrEnum):
    """`imagegen.schemas.Priority` as typer offers a choice: an enum."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


def submit(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Who asks; the Kafka key.")],
    idempotency_key: Annotated[
        str | None, typer.Option(help="Requests with the same key render once.")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What not to draw.")] = None,
    seed: Annotated[int | None, typer.Option(help="0 to 2^32-1; derived when absent.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps, 1-100.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale, 0-30.")] = None,
    width: Annotated[int | None, typer.Option(help="Multiple of 8, 64-2048.")] = None,
    height: Annotated[int | None, typer.Option(help="Multiple of 8, 64-2048.")] = None,
    model: Annotated[str | None, typer.Option(help="A registered model name.")] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="png, jpeg or webp.")
    ] = None,
    priority: Annotated[
        PriorityChoice | None,
        typer.Option(
            help="interactive (the default) renders first; batch only while no interactive "
            "work waits.",
        ),
    ] = None,
    ttl: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds from now after which no render starts (the result says expired); "
            "default IMAGEGEN_DEFAULT_TTL_S of the processor.",
        ),
    ] = None,
    expires_at: Annotated[
        datetime | None,
        typer.Option(
            parser=iso_time,
            help="When no render may start any more, instead of --ttl: ISO-8601 (UTC if no "
            "offset).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the published request (or result) as JSON.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show progress, then print the result.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.", min=0)] = 300.0,
    edit: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Edit this image (PNG, JPEG or WebP): uploaded, then named by the request.",
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="With --edit: inpaint where this mask is white (black is kept).",
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(help="With --edit: how far to move from the image, 0 < s <= 1 (0.8)."),
    ] = None,
) -> None:
    """Publish a generation request and print its request id (or, with --wait, its result:
    exit 1 if it failed, was rejected, canceled or expired)."""
    if ttl is not None and expires_at is not None:
        raise typer.BadParameter("give --ttl or --expires-at, not both", param_hint="--ttl")
    if edit is None and (mask is not None or strength is not None):
        hint = "--mask" if mask is not None else "--strength"
        raise typer.BadParameter("needs --edit, the image to change", param_hint=hint)
    submitted_at = utc_now()
    if ttl is not None:
        expires_at = submitted_at + timedelta(seconds=ttl)
    options: dict[str, object] = {
        "idempotency_key": idempotency_key,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance,
        "width": width,
        "height": height,
        "model": model,
        "output_format": output_format,
        "priority": None if priority is None else priority.value,
        "expires_at": expires_at,
    }
    settings = load_settings()
    check_broker(settings)  # fail fast, before librdkafka retries for the delivery timeout
    if edit is not None:
        options |= _edit_options(settings, user, edit, mask, strength)
    given = {name: value for name, value in options.items() if value is not None}
    request = GenerationRequest.new(prompt=prompt, user_id=user, submitted_at=submitted_at, **given)
    if not wait:
        with RequestPublisher(settings) as publisher:
            publisher.publish(request)
        console.print(encode(request).decode() if as_json else request.request_id)
        return
    # Follow first: an event or result published before the follower existed could be
    # missed. Only the partitions where this request's events and results land are read.
    with (
        JobFollower(settings, [request.request_id]) as follower,
        RequestPublisher(settings) as publisher,
    ):
        publisher.publish(request)
        waiting = f"submitted {request.request_id}, waiting for the processor"
        result = wait_with_progress(follower, request.request_id, timeout, waiting)
    conclude(result, settings, as_json)


def _edit_options(
    settings: Settings, user_id: str, image: Path, mask: Path | None, strength: float | None
) -> dict[str, object]:
    """The request fields of an edit (an inpaint with a mask), its files uploaded."""
    return {
        "task": "edit" if mask is None else "inpaint",
        "image": upload_file(settings, user_id, image),
        "mask": None if mask is None else upload_file(settings, user_id, mask),
        "strength": strength,
    }
