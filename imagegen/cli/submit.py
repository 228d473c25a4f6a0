"""`imagegen submit`: publish one request from the command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from imagegen.consumers.results import ResultSubscriber
from imagegen.infra.kafka import check_broker
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import GenerationRequest, GenerationResult, Status, encode

console = Console(soft_wrap=True, highlight=False)


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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the published request (or result) as JSON.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.", min=0)] = 300.0,
) -> None:
    """Publish a generation request and print its request id (or, with --wait, its result)."""
    options = {
        "idempotency_key": idempotency_key,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance,
        "width": width,
        "height": height,
        "model": model,
        "output_format": output_format,
    }
    given = {name: value for name, value in options.items() if value is not None}
    request = GenerationRequest.new(prompt=prompt, user_id=user, **given)
    settings = load_settings()
    check_broker(settings)  # fail fast, before librdkafka retries for the delivery timeout
    if not wait:
        with RequestPublisher(settings) as publisher:
            publisher.publish(request)
        console.print(encode(request).decode() if as_json else request.request_id)
        return
    # Subscribe first: a result published before the subscriber existed could be missed.
    # Only the partition where this request's results land is read.
    with (
        ResultSubscriber(settings, request_ids=[request.request_id]) as results,
        RequestPublisher(settings) as publisher,
    ):
        publisher.publish(request)
        with console.status(f"waiting for {request.request_id} ..."):
            result = results.wait_for([request.request_id], timeout)[request.request_id]
    print_result(result, settings, as_json)
    if result.status in (Status.FAILED, Status.REJECTED):
        raise typer.Exit(1)


def print_result(result: GenerationResult, settings: Settings, as_json: bool) -> None:
    """One result, with a download URL when it succeeded."""
    url = None
    if result.status is Status.SUCCEEDED and result.object_key:
        url = ObjectStore(settings).presigned_url(result.object_key)
    if as_json:
        console.print_json(data={**result.model_dump(mode="json"), "url": url})
        return
    console.print(f"{result.request_id} {result.status.value}")
    if result.reason is not None:
        console.print(f"  reason: {result.reason.value}: {result.detail or ''}")
    if result.duplicate_of is not None:
        console.print(f"  duplicate of: {result.duplicate_of}")
    if result.retry_after_ms is not None:
        console.print(f"  retry after: {result.retry_after_ms} ms")
    if url is not None:
        console.print(f"  object: s3://{result.bucket}/{result.object_key}")
        console.print(f"  url: {url}")
