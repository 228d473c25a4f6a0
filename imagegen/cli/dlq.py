"""`imagegen dlq list|replay`: inspect the dead letters and send them back through."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import islice
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from imagegen.cli.times import iso_time
from imagegen.consumers.dlq import FailedRecords, Failure, Filters, ReplaySummary, replay
from imagegen.infra.kafka import check_broker
from imagegen.infra.settings import load_settings
from imagegen.schemas import Stage
from imagegen.schemas.topics import DLQ

console = Console(soft_wrap=True, highlight=False)
dlq_app = typer.Typer(
    no_args_is_help=True,
    help=f"Inspect and replay the dead letters on {DLQ}, one row per failed record: its "
    "latest letter (a replay that fails again adds a letter to the same record). Filters "
    "select by that latest letter and combine: every one given must hold.",
)
#: Rows per printed table: a listing prints as it reads, so it never holds the whole DLQ.
PAGE_ROWS = 100


def _positive(rate: float | None) -> float | None:
    if rate is not None and rate <= 0:
        raise typer.BadParameter("must be above 0 messages per second")
    return rate


RequestId = Annotated[
    str | None, typer.Option(help="Only the original request with this request_id.")
]
ErrorClass = Annotated[
    str | None,
    typer.Option(help="Only this exception: the full name or the last part (InvalidMessage)."),
]
StageOption = Annotated[Stage | None, typer.Option(help="Only failures at this stage.")]
Since = Annotated[
    datetime | None,
    typer.Option(
        parser=iso_time, help="Only failures at or after this ISO-8601 time (UTC if no offset)."
    ),
]
Until = Annotated[
    datetime | None,
    typer.Option(
        parser=iso_time, help="Only failures before this ISO-8601 time (UTC if no offset)."
    ),
]
Partition = Annotated[int | None, typer.Option(min=0, help=f"Only this partition of {DLQ}.")]
FromOffset = Annotated[
    int | None,
    typer.Option(min=0, help=f"Only {DLQ} offsets from this one, in every partition read."),
]
ToOffset = Annotated[
    int | None,
    typer.Option(
        min=0, help=f"Only {DLQ} offsets up to this one (inclusive), in every partition read."
    ),
]


@dlq_app.command("list")
def list_entries(
    request_id: RequestId = None,
    error_class: ErrorClass = None,
    stage: StageOption = None,
    since: Since = None,
    until: Until = None,
    partition: Partition = None,
    from_offset: FromOffset = None,
    to_offset: ToOffset = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List each failed record once, by its latest dead letter, with its context and how
    many of its replays failed again; oldest first in each partition."""
    filters = Filters(
        request_id=request_id,
        error_class=error_class,
        stage=stage,
        since=since,
        until=until,
        partition=partition,
        from_offset=from_offset,
        to_offset=to_offset,
    )
    settings = load_settings()
    check_broker(settings)
    records = FailedRecords(settings, filters)
    if as_json:
        for failure in records:
            typer.echo(json.dumps(_as_json(failure)))
        return
    count = len(records)
    console.print(f"{DLQ}: {count} failed record{'' if count == 1 else 's'}")
    for page in _pages(records):
        console.print(_table(page))


@dlq_app.command("replay")
def replay_entries(
    request_id: RequestId = None,
    error_class: ErrorClass = None,
    stage: StageOption = None,
    since: Since = None,
    until: Until = None,
    partition: Partition = None,
    from_offset: FromOffset = None,
    to_offset: ToOffset = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be replayed; publish nothing.")
    ] = False,
    rate: Annotated[
        float | None,
        typer.Option(callback=_positive, help="At most this many messages per second."),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Replay the whole DLQ without asking.")
    ] = False,
    again: Annotated[
        bool,
        typer.Option(
            "--again", help="Also replay records whose replay failed again (their latest letter)."
        ),
    ] = False,
) -> None:
    """Republish each selected failed record's latest dead letter to its original topic,
    with the header replay.of signed with IMAGEGEN_REPLAY_KEY.

    Safe to run twice: a record whose replay failed again is skipped unless --again is
    given, so a second run while the cause persists publishes nothing. (A run started
    before the first run's replays have failed again cannot know they will.) Exits 1 when
    a message could not be delivered.
    """
    filters = Filters(
        request_id=request_id,
        error_class=error_class,
        stage=stage,
        since=since,
        until=until,
        partition=partition,
        from_offset=from_offset,
        to_offset=to_offset,
    )
    confirm = filters.selects_everything and not (yes or dry_run)
    if confirm and not sys.stdin.isatty():
        typer.echo(
            f"refusing to replay all of {DLQ} without confirmation, and stdin is no terminal "
            "to ask on. Pass --yes, or select entries with a filter (see --help).",
            err=True,
        )
        raise typer.Exit(2)
    settings = load_settings()
    check_broker(settings)
    records = FailedRecords(settings, filters)
    if not records:
        console.print(f"no failed records in {DLQ} match; nothing to replay")
        return
    if confirm:
        typer.confirm(
            f"Replay all {len(records)} failed records of {DLQ} to their original topics?",
            abort=True,
        )
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("checking" if dry_run else "replaying", total=len(records))
        summary = replay(
            settings,
            records,
            again=again,
            dry_run=dry_run,
            rate=rate,
            progress=lambda done, _total: progress.update(task, completed=done),
        )
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


def _pages(records: Iterable[Failure]) -> Iterator[list[Failure]]:
    rows = iter(records)
    while page := list(islice(rows, PAGE_ROWS)):
        yield page


def _table(page: list[Failure]) -> Table:
    table = Table()
    for column in ("dlq", "failed at", "stage"):
        table.add_column(column, no_wrap=True)
    # Text folds onto more lines in a narrow terminal rather than lose characters.
    table.add_column("error", overflow="fold")
    table.add_column("message", ratio=1, min_width=16, overflow="fold")
    for column in ("attempts", "replays"):
        table.add_column(column, justify="right", no_wrap=True)
    for column in ("original", "request id"):
        table.add_column(column, overflow="fold")
    for failure in page:
        entry = failure.latest
        where = f"{entry.partition}/{entry.offset}"
        letter = entry.letter
        if letter is None:
            table.add_row(where, "", "", "[red]unreadable[/red]", escape(entry.problem))
            continue
        table.add_row(
            where,
            f"{letter.failed_at:%Y-%m-%d %H:%M:%S}",
            letter.stage.value,
            escape(letter.error_class),
            escape(_short(letter.error_message)),
            str(letter.attempts),
            str(failure.replays),
            escape(f"{letter.original_topic}/{letter.original_partition}/{letter.original_offset}"),
            escape(entry.request_id or ("(in object store)" if letter.original_object else "")),
        )
    return table


def _short(message: str, limit: int = 60) -> str:
    line = message.strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _as_json(failure: Failure) -> dict[str, Any]:
    entry = failure.latest
    where = {
        "dlq_partition": entry.partition,
        "dlq_offset": entry.offset,
        "dlq_timestamp_ms": entry.timestamp_ms,
        "replays": failure.replays,
        "first_entry": failure.first,
    }
    letter = entry.letter
    if letter is None:
        return {**where, "readable": False, "problem": entry.problem}
    spilled = letter.original_object is not None
    return {
        **where,
        "readable": True,
        "failed_at": letter.failed_at.isoformat(),
        "stage": letter.stage.value,
        "error_class": letter.error_class,
        "error_message": letter.error_message,
        "error_stacktrace": letter.error_stacktrace,
        "attempts": letter.attempts,
        "group": letter.group,
        "original_topic": letter.original_topic,
        "original_partition": letter.original_partition,
        "original_offset": letter.original_offset,
        "original_timestamp_ms": letter.original_timestamp_ms,
        # Set when the letter was too large to send: the original's bytes are in this object
        # (in the images bucket), and key, value and headers are not shown.
        "original_object": letter.original_object,
        "request_id": entry.request_id,
        # Keys are user or request ids in practice; escape whatever else turns up.
        "key": None if letter.key is None else letter.key.decode(errors="backslashreplace"),
        "value_bytes": None if spilled else len(letter.value or b""),
        "headers": None if spilled else [name for name, _ in letter.original_headers],
    }


def _print_summary(summary: ReplaySummary) -> None:
    verb = "would replay" if summary.dry_run else "replayed"
    for replayed in summary.replayed:
        request = f" (request {escape(replayed.request_id)})" if replayed.request_id else ""
        console.print(f"{verb} {replayed.coordinates} to {replayed.topic}{request}")
    for coordinates, reason in summary.skipped:
        console.print(f"skipped {coordinates}: {escape(reason)}")
    for coordinates, reason in summary.failed:
        console.print(f"[red]failed[/red] {coordinates}: {escape(reason)}")
    line = (
        f"{'dry run: ' if summary.dry_run else ''}{verb} {len(summary.replayed)} of "
        f"{summary.selected} selected records, skipped {len(summary.skipped)}, "
        f"failed {len(summary.failed)}"
    )
    console.print(line + ("; nothing was published" if summary.dry_run else ""))
    if summary.replayed and not summary.dry_run:
        console.print(_how_to_follow(summary))


def _how_to_follow(summary: ReplaySummary) -> str:
    example = next((r.request_id for r in summary.replayed if r.request_id), "<request id>")
    return (
        "follow their results with `imagegen results --follow`; a replay that fails again "
        "shows up in `imagegen dlq list` with one more replay. One request's image: "
        f"`imagegen fetch {escape(example)} -o image.png`"
    )
