"""`imagegen watch`: a request's progress, live, until its result; and the progress display
that `imagegen submit --wait` shares.

Progress goes to stderr, so that stdout holds only the result (`--json` stays parseable). On
a terminal it is one live bar; elsewhere (a pipe, a log) it is one line per event.
"""

from __future__ import annotations

from typing import Annotated, Self

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from imagegen.cli.results import conclude, parse_request_id
from imagegen.consumers.events import JobFollower
from imagegen.infra.kafka import check_broker
from imagegen.infra.settings import load_settings
from imagegen.schemas import EventType, GenerationResult, JobEvent

progress_console = Console(stderr=True, soft_wrap=True, highlight=False)


def watch(
    request_id: Annotated[str, typer.Argument(help="The request to watch.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.", min=0)] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Show a request's progress (queued, started, steps) until its result, then print the
    result as `submit --wait` does; exit 1 if it failed, was rejected, canceled or expired."""
    request_id = parse_request_id(request_id)
    settings = load_settings()
    check_broker(settings)
    # From the beginning: the events so far say where the request stands, and a result that
    # is already there ends the watch as soon as it is read.
    with JobFollower(settings, [request_id], start="beginning") as follower:
        result = wait_with_progress(follower, request_id, timeout, f"watching {request_id}")
    conclude(result, settings, as_json)


def wait_with_progress(
    follower: JobFollower, request_id: str, timeout_s: float, waiting: str
) -> GenerationResult:
    """The request's latest result, showing its events meanwhile; `ResultTimeout` if none
    comes within `timeout_s`."""
    with ProgressView(progress_console, waiting) as view:
        return follower.wait_for([request_id], timeout_s, on_event=view.show)[request_id]


class ProgressView:
    """One request's events: a live bar on a terminal, a line per event elsewhere."""

    def __init__(self, console: Console, waiting: str) -> None:
        self._console = console
        self._waiting = waiting
        self._bar: Progress | None = None
        if console.is_terminal and not console.is_dumb_terminal:
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,  # the result, printed next, says how it ended
            )
            self._task = self._bar.add_task(escape(waiting), total=None)

    def __enter__(self) -> Self:
        if self._bar is None:
            self._console.print(escape(self._waiting))
        else:
            self._bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def show(self, event: JobEvent) -> None:
        text = escape(describe(event))
        if self._bar is None:
            self._console.print(f"{event.at:%H:%M:%S} {text}")
            return
        # None leaves a field as it was: steps are known only once a render reports them.
        self._bar.update(
            self._task, description=text, total=event.steps, completed=event.step, refresh=True
        )


def describe(event: JobEvent) -> str:
    """A few words for where the request stands after `event`."""
    match event.type:
        case EventType.ADMITTED:
            parts = ["queued"]
            if event.queue_position is not None:
                parts.append(f"{event.queue_position} ahead")
            if event.estimated_start_at is not None:
                parts.append(f"expected to start at {event.estimated_start_at:%H:%M:%S} UTC")
            return ", ".join(parts)
        case EventType.STARTED:
            return "rendering" + (f" on {event.worker_id}" if event.worker_id else "")
        case EventType.PROGRESS:
            done = "?" if event.step is None else str(event.step)
            return f"step {done}/{event.steps or '?'}"
        case EventType.FINISHED:
            return "finished" + (f": {event.status.value}" if event.status else "")
