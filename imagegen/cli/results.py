"""`imagegen results` and `imagegen fetch`: read answers and download images; and how the
commands that wait for one answer (`submit --wait`, `watch`) print it.

Both show each request's latest result: a request replayed from the DLQ has a failed result
and, after it, a succeeded one, and its state is the succeeded one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console

from imagegen.consumers.results import ResultSubscriber, latest_result, latest_results
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.schemas import GenerationResult, Status
from imagegen.schemas.fields import PATTERN_HELP, RequestId

console = Console(soft_wrap=True, highlight=False)
#: A command that waited for one of these exits 1: the request has no image.
UNSUCCESSFUL = frozenset({Status.FAILED, Status.REJECTED, Status.CANCELED, Status.EXPIRED})


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
    """Print each request's latest result on imagegen.results (or, with --follow, new
    results as they arrive: a later one for the same request supersedes the earlier)."""
    retained = not follow or from_beginning
    with ResultSubscriber(load_settings(), start="beginning" if retained else "end") as subscriber:
        if retained:
            # Held until caught up, one result per request: a later one may supersede any.
            _print(latest_results(_of(user, subscriber.until_caught_up())).values(), as_json)
        if follow:
            _print(_of(user, subscriber.follow()), as_json)


def fetch(
    request_id: Annotated[str, typer.Argument(help="The request whose image to download.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the image.")],
) -> None:
    """Download the image of a request whose latest result is succeeded."""
    request_id = parse_request_id(request_id)
    settings = load_settings()
    with console.status(f"looking for the result of {request_id} ..."):
        found = latest_result(settings, request_id)
    if found is None:
        raise typer.BadParameter(
            f"no result for {request_id} on imagegen.results yet; check the id, or wait with "
            f"`imagegen results --follow --user <user>`",
            param_hint="REQUEST_ID",
        )
    if found.status is not Status.SUCCEEDED or found.object_key is None:
        console.print(f"{request_id} has no image: {_line(found)}")
        if found.status is Status.FAILED:
            console.print(
                f"see why with `imagegen dlq list --request-id {request_id}`, and once the "
                f"cause is fixed, `imagegen dlq replay --request-id {request_id}`"
            )
        raise typer.Exit(1)
    data = ObjectStore(settings).get(found.object_key)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    console.print(f"wrote {output} ({len(data)} bytes, {found.content_type})")


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


def conclude(result: GenerationResult, settings: Settings, as_json: bool) -> None:
    """Print the result a command waited for; exit 1 if it failed, was rejected, canceled
    or expired."""
    print_result(result, settings, as_json)
    if result.status in UNSUCCESSFUL:
        raise typer.Exit(1)


def parse_request_id(given: str) -> str:
    """`given` if it is a request id, else a usage error that says where to find one."""
    try:
        return TypeAdapter(RequestId).validate_python(given)
    except ValidationError as exc:
        error = exc.errors()[0]
        reason = PATTERN_HELP.get(error.get("ctx", {}).get("pattern", ""), error["msg"])
        raise typer.BadParameter(
            f"{given!r} is not a request id ({reason}); copy it from `imagegen submit` or "
            "`imagegen results`",
            param_hint="REQUEST_ID",
        ) from None


def _of(user: str | None, results: Iterable[GenerationResult]) -> Iterator[GenerationResult]:
    return (result for result in results if user is None or result.user_id == user)


def _print(results: Iterable[GenerationResult], as_json: bool) -> None:
    for result in results:
        console.print(result.model_dump_json() if as_json else _line(result))


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
