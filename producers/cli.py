"""`imagegen submit`: publish one request from the command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from infra.kafka import check_broker
from infra.settings import load_settings
from producers.publisher import RequestPublisher
from schemas import GenerationRequest, encode

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
        bool, typer.Option("--json", help="Print the published request as JSON.")
    ] = False,
) -> None:
    """Publish a generation request and print its request id."""
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
    with RequestPublisher(settings) as publisher:
        publisher.publish(request)
    console.print(encode(request).decode() if as_json else request.request_id)
