"""`imagegen cancel`: ask that a request stop."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from imagegen.cli.results import parse_request_id
from imagegen.infra.kafka import check_broker
from imagegen.infra.settings import load_settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import encode
from imagegen.schemas.topics import CANCELLATIONS

console = Console(soft_wrap=True, highlight=False)


def cancel(
    request_id: Annotated[str, typer.Argument(help="The request to stop.")],
    user: Annotated[
        str,
        typer.Option(
            "--user", "-u", help="Who submitted it: only its owner's cancellation is honoured."
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the published cancellation as JSON.")
    ] = False,
) -> None:
    """Publish a cancellation of a request. If it lands before the render finishes, the
    request's result says canceled; if not, the result stands."""
    request_id = parse_request_id(request_id)
    settings = load_settings()
    check_broker(settings)  # fail fast, before librdkafka retries for the delivery timeout
    with RequestPublisher(settings) as publisher:
        sent = publisher.cancel(request_id, user)
    if as_json:
        console.print(encode(sent).decode())
        return
    console.print(
        f"cancellation of {sent.request_id} by {sent.user_id} at "
        f"{sent.requested_at:%Y-%m-%dT%H:%M:%SZ} is on {CANCELLATIONS}"
    )
    console.print(
        "If it landed before the render finished, the result will say canceled; see it with "
        f"`imagegen watch {sent.request_id}`."
    )
