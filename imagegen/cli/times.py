"""Times given on the command line: ISO-8601 (UTC unless it says otherwise), or, for a
moment in the past, how long ago (`90s`, `30m`, `1h`, `7d`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import typer

from imagegen.schemas.fields import utc_now

_AGO = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def iso_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO-8601 time; try 2025-06-01 or 2025-06-01T12:00:00+02:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def past_time(text: str) -> datetime:
    """`iso_time`, or that long before now: `30m` is half an hour ago."""
    ago = _AGO.fullmatch(text.strip())
    if ago is not None:
        amount, unit = ago.groups()
        return utc_now() - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        return iso_time(text)
    except typer.BadParameter:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO-8601 time (2025-06-01T12:00:00Z) nor a time ago "
            "(90s, 30m, 1h, 7d)"
        ) from None
