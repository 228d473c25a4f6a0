"""`imagegen results` and `imagegen fetch`: read answers and download images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from imagegen.consumers.results import ResultSubscriber, Start
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import load_settings
from imagegen.schemas import GenerationResult, Status

console = Console(soft_wrap=True, highlight=False)


def results(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing results as they arrive.")
    ] = False,
    from_beginning: Annotated[
        bool,
        typer.Option(help="With --follow, start with the results already there."),
    ] = False,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the results on imagegen.results (all of them, or new ones with --follow)."""
    start: Start = "end" if follow and not from_beginning else "beginning"
    with ResultSubscriber(load_settings(), start=start) as subscriber:
        stream = subscriber.follow() if follow else subscriber.until_caught_up()
        for result in stream:
            if user is None or result.user_id == user:
                console.print(result.model_dump_json() if as_json else _line(result))


def fetch(
    request_id: Annotated[str, typer.Argument(help="The request whose image to download.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the image.")],
) -> None:
    """Download the image of a succeeded request."""
    settings = load_settings()
    with (
        console.status(f"looking for the result of {request_id} ..."),
        ResultSubscriber(settings, start="beginning") as subscriber,
    ):
        found = next((r for r in subscriber.until_caught_up() if r.request_id == request_id), None)
    if found is None:
        raise typer.BadParameter(
            f"no result for {request_id} on imagegen.results yet; check the id, or wait with "
            f"`imagegen results --follow --user <user>`",
            param_hint="REQUEST_ID",
        )
    if found.status is not Status.SUCCEEDED or found.object_key is None:
        console.print(f"{request_id} has no image: {_line(found)}")
        raise typer.Exit(1)
    data = ObjectStore(settings).get(found.object_key)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    console.print(f"wrote {output} ({len(data)} bytes, {found.content_type})")


def _line(result: GenerationResult) -> str:
    match result.status:
        case Status.SUCCEEDED:
            detail = f"s3://{result.bucket}/{result.object_key}"
        case Status.DUPLICATE:
            detail = f"duplicate of {result.duplicate_of}"
        case _:
            reason = result.reason.value if result.reason else ""
            detail = f"{reason}: {result.detail or ''}"
    when = f"{result.completed_at:%H:%M:%S}"
    return f"{when} {result.request_id} {result.user_id} {result.status.value} {detail}"
