"""`imagegen dlq list|replay`: inspect the dead letters and send them back through."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from imagegen.consumers.dlq import Entry, Filters, ReplaySummary, read_dlq, replay
from imagegen.infra.kafka import check_broker
from imagegen.infra.settings import load_settings
from imagegen.schemas import Stage
from imagegen.schemas.topics import DLQ

console = Console(soft_wrap=True, highlight=False)
dlq_app = typer.Typer(
    no_args_is_help=True,
    help=f"Inspect and replay the dead letters on {DLQ}. Filters combine: every one given "
    "must hold.",
)


def _utc_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO-8601 time; try 2025-06-01 or 2025-06-01T12:00:00+02:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
        parser=_utc_time, help="Only failures at or after this ISO-8601 time (UTC if no offset)."
    ),
]
Until = Annotated[
    datetime | None,
    typer.Option(
        parser=_utc_time, help="Only failures before this ISO-8601 time (UTC if no offset)."
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
    """List the dead letters with their context, oldest first in each partition."""
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
    if as_json:
        for entry in read_dlq(settings, filters):
            typer.echo(json.dumps(_as_json(entry)))
        return
    entries = sorted(read_dlq(settings, filters), key=lambda e: (e.partition, e.offset))
    console.print(_table(entries))


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
) -> None:
    """Republish dead letters to their original topics, with the header replay.of.

    Exits 1 when a message could not be delivered.
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
    entries = list(read_dlq(settings, filters))
    if not entries:
        console.print(f"no entries of {DLQ} match; nothing to replay")
        return
    if confirm:
        typer.confirm(
            f"Replay all {len(entries)} entries of {DLQ} to their original topics?", abort=True
        )
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("checking" if dry_run else "replaying", total=len(entries))
        summary = replay(
            settings,
            entries,
            dry_run=dry_run,
            rate=rate,
            progress=lambda done, _total: progress.update(task, completed=done),
        )
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


def _table(entries: list[Entry]) -> Table:
    table = Table(title=f"{DLQ}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for column in ("dlq", "failed at", "stage"):
        table.add_column(column, no_wrap=True)
    # Text folds onto more lines in a narrow terminal rather than lose characters.
    table.add_column("error", overflow="fold")
    table.add_column("message", ratio=1, min_width=16, overflow="fold")
    table.add_column("attempts", justify="right", no_wrap=True)
    for column in ("original", "request id"):
        table.add_column(column, overflow="fold")
    for entry in entries:
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
            escape(f"{letter.original_topic}/{letter.original_partition}/{letter.original_offset}"),
            escape(entry.request_id or ""),
        )
    return table


def _short(message: str, limit: int = 60) -> str:
    line = message.strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _as_json(entry: Entry) -> dict[str, Any]:
    where = {
        "dlq_partition": entry.partition,
        "dlq_offset": entry.offset,
        "dlq_timestamp_ms": entry.timestamp_ms,
    }
    letter = entry.letter
    if letter is None:
        return {**where, "readable": False, "problem": entry.problem}
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
        "request_id": entry.request_id,
        # Keys are user or request ids in practice; escape whatever else turns up.
        "key": None if letter.key is None else letter.key.decode(errors="backslashreplace"),
        "value_bytes": len(letter.value or b""),
        "headers": [name for name, _ in letter.original_headers],
    }


def _print_summary(summary: ReplaySummary) -> None:
    if summary.dry_run:
        for entry in summary.replayed:
            assert entry.letter is not None  # only dead letters are replayed
            console.print(f"would replay {entry.coordinates} to {entry.letter.original_topic}")
    for entry, reason in summary.skipped:
        console.print(f"skipped {entry.coordinates}: {escape(reason)}")
    for entry, reason in summary.failed:
        console.print(f"[red]failed[/red] {entry.coordinates}: {escape(reason)}")
    verb = "dry run: would replay" if summary.dry_run else "replayed"
    line = (
        f"{verb} {len(summary.replayed)} of {summary.selected} selected entries, "
        f"skipped {len(summary.skipped)}, failed {len(summary.failed)}"
    )
    console.print(line + ("; nothing was published" if summary.dry_run else ""))
