"""Metering: requests, images and device time by user and model, from `imagegen.results`.

Each request counts once, by its latest result: at least once delivery can publish a result
twice, and a replayed request is answered again. So a request whose latest result falls in
the window counts, with that result's `device_ms` (device time spent on earlier attempts is
not in it). Images are the requests whose latest result succeeded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from imagegen.consumers.results import ResultSubscriber
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, Status


@dataclass(frozen=True)
class Window:
    """Which latest results count: `since` (inclusive) and `until` (exclusive) bound
    `completed_at`, and both need a timezone; `user_id` keeps one user's."""

    since: datetime | None = None
    until: datetime | None = None
    user_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            moment: datetime | None = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name}={moment} needs a timezone, e.g. {moment}+00:00")

    def covers(self, completed_at: datetime) -> bool:
        return (self.since is None or completed_at >= self.since) and (
            self.until is None or completed_at < self.until
        )


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    images: int = 0
    device_ms: float = 0.0

    @property
    def device_seconds(self) -> float:
        return self.device_ms / 1000

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.requests + other.requests,
            self.images + other.images,
            self.device_ms + other.device_ms,
        )


@dataclass(frozen=True)
class Usage:
    """One user's use of one model (None: results that name no model, such as rejections)."""

    user_id: str
    model: str | None
    totals: Totals


class _Charge(NamedTuple):
    """What a latest result counts for; kept instead of the result, as a week of results
    is read into memory."""

    user_id: str
    model: str | None
    completed_at: datetime
    totals: Totals

    @classmethod
    def of(cls, result: GenerationResult) -> _Charge:
        images = int(result.status is Status.SUCCEEDED)
        totals = Totals(1, images, result.device_ms or 0.0)
        return cls(result.user_id, result.model, result.completed_at, totals)


def usage(results: Iterable[GenerationResult], window: Window = Window()) -> list[Usage]:
    """Totals by (user, model), sorted so, of the latest result of each request among
    `results` (given in offset order, as a subscriber reads them) that `window` takes."""
    latest: dict[str, _Charge] = {}
    for result in results:
        if window.user_id is None or result.user_id == window.user_id:
            latest[result.request_id] = _Charge.of(result)  # a later one is newer
    totals: dict[tuple[str, str | None], Totals] = {}
    for charge in latest.values():
        if window.covers(charge.completed_at):
            key = (charge.user_id, charge.model)
            totals[key] = totals.get(key, Totals()) + charge.totals
    ordered = sorted(totals.items(), key=lambda item: (item[0][0], item[0][1] or ""))
    return [Usage(user_id, model, sums) for (user_id, model), sums in ordered]


def total(rows: Iterable[Usage]) -> Totals:
    return sum((row.totals for row in rows), Totals())


def read_usage(settings: Settings, window: Window = Window()) -> list[Usage]:
    """`usage` of everything retained on `imagegen.results`."""
    with ResultSubscriber(settings, start="beginning") as subscriber:
        return usage(subscriber.until_caught_up(), window)
