"""`imagegen usage`: requests, images and device time by user and model."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagegen.cli.times import past_time
from imagegen.consumers.usage import Totals, Usage, Window, read_usage, total
from imagegen.infra.kafka import check_broker
from imagegen.infra.settings import load_settings
from imagegen.schemas.topics import RESULTS

console = Console(soft_wrap=True, highlight=False)
status_console = Console(stderr=True)  # stdout holds only the report

_TIME_HELP = "ISO-8601 (UTC if no offset) or a time ago: 90s, 30m, 1h, 7d."


def usage(
    since: Annotated[
        datetime | None,
        typer.Option(parser=past_time, help=f"Only results completed from this on. {_TIME_HELP}"),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(parser=past_time, help=f"Only results completed before this. {_TIME_HELP}"),
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Requests, images (succeeded requests) and device seconds by user and model, from each
    request's latest result retained on imagegen.results."""
    settings = load_settings()
    check_broker(settings)
    window = Window(since, until, user)
    with status_console.status(f"reading {RESULTS} ..."):
        rows = read_usage(settings, window)
    if as_json:
        typer.echo(json.dumps(_as_json(window, rows), indent=2))
    else:
        console.print(_table(window, rows))


def _as_json(window: Window, rows: list[Usage]) -> dict[str, Any]:
    return {
        "since": None if window.since is None else window.since.isoformat(),
        "until": None if window.until is None else window.until.isoformat(),
        "user_id": window.user_id,
        "rows": [
            {"user_id": row.user_id, "model": row.model, **_counts(row.totals)} for row in rows
        ],
        "total": _counts(total(rows)),
    }


def _counts(totals: Totals) -> dict[str, Any]:
    return {
        "requests": totals.requests,
        "images": totals.images,
        "device_seconds": totals.device_seconds,
    }


def _table(window: Window, rows: list[Usage]) -> Table:
    since = "the start" if window.since is None else f"{window.since:%Y-%m-%d %H:%M:%S %Z}"
    until = "now" if window.until is None else f"{window.until:%Y-%m-%d %H:%M:%S %Z}"
    table = Table(title=f"usage from {since} to {until}", title_justify="left")
    table.add_column("user")
    table.add_column("model")
    for column in ("requests", "images", "device s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(escape(row.user_id), escape(row.model or "-"), *_numbers(row.totals))
    table.add_section()
    table.add_row("total", "", *_numbers(total(rows)))
    return table


def _numbers(totals: Totals) -> tuple[str, str, str]:
    return str(totals.requests), str(totals.images), f"{totals.device_seconds:.3f}"
