"""Following a job on the real broker: events, events with results, `imagegen watch`,
`imagegen submit --wait` with progress, and `imagegen cancel`.

The test plays the processor and the worker: it writes the events and results itself, with
real producers, onto the real topics.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import Message
from rich.console import Console

from imagegen.cli.watch import ProgressView, describe
from imagegen.consumers.events import EventSubscriber, JobFollower
from imagegen.infra.kafka import make_admin, make_producer
from imagegen.infra.partitioning import partition_for
from imagegen.infra.settings import Settings
from imagegen.schemas import (
    CancelRequest,
    EventType,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    Reason,
    Status,
    decode,
    encode,
    new_request_id,
)
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import CANCELLATIONS, EVENTS, REQUESTS, RESULTS
from tests.conftest import settings_env
from tests.helpers import imagegen, read_topic

Record = JobEvent | GenerationResult


def event(request_id: str, type: EventType, **fields: object) -> JobEvent:
    return JobEvent(request_id=request_id, user_id="wes", type=type, at=utc_now(), **fields)


def progress(request_id: str, step: int, steps: int) -> JobEvent:
    return event(request_id, EventType.PROGRESS, step=step, steps=steps)


def succeeded(request_id: str, user: str = "wes") -> GenerationResult:
    return GenerationResult(
        request_id=request_id,
        user_id=user,
        status=Status.SUCCEEDED,
        bucket="images",
        object_key=f"v1/{user}/{request_id}.png",
        content_type="image/png",
        size_bytes=10,
        sha256="ab" * 32,
        completed_at=utc_now(),
    )


def send(settings: Settings, *records: Record | tuple[str, bytes, bytes]) -> None:
    """Each record onto its topic, keyed as the pipeline keys it; a (topic, key, value)
    triple goes as it is."""
    producer = make_producer(settings)
    for record in records:
        if isinstance(record, tuple):
            producer.produce(record[0], key=record[1], value=record[2])
        else:
            topic = EVENTS if isinstance(record, JobEvent) else RESULTS
            producer.produce(topic, key=record.kafka_key, value=encode(record))
    assert producer.flush(10) == 0


def neighbour_of(settings: Settings, request_id: str) -> str:
    """Another request id whose events land in the same partition of imagegen.events."""
    count = len(make_admin(settings).list_topics(EVENTS).topics[EVENTS].partitions)
    home = partition_for(request_id.encode(), count)
    return next(
        other
        for other in iter(new_request_id, None)
        if partition_for(other.encode(), count) == home
    )


def test_events_from_the_beginning_skip_others_and_the_unreadable(settings: Settings) -> None:
    mine = new_request_id()
    other = neighbour_of(settings, mine)
    admitted, started = event(mine, EventType.ADMITTED), event(mine, EventType.STARTED)
    garbage = (EVENTS, mine.encode(), b"{not json")
    send(settings, admitted, garbage, event(other, EventType.ADMITTED), started)
    with EventSubscriber(settings, start="beginning", request_ids=[mine]) as subscriber:
        assert list(subscriber.until_caught_up()) == [admitted, started]


def test_events_from_the_end_start_where_the_subscriber_was_made(settings: Settings) -> None:
    mine = new_request_id()
    with EventSubscriber(settings, request_ids=[mine]) as subscriber:
        later = event(mine, EventType.ADMITTED, queue_position=0)
        send(settings, later)
        assert next(subscriber.follow()) == later


def test_a_follower_sees_the_events_then_returns_the_result(settings: Settings) -> None:
    mine = new_request_id()
    steps = [progress(mine, 1, 2), progress(mine, 2, 2)]
    result = succeeded(mine)
    seen: list[JobEvent] = []

    def on_event(update: JobEvent) -> None:
        seen.append(update)
        if update == steps[-1]:
            send(settings, result)  # answered only once the last step was shown

    with JobFollower(settings, [mine]) as follower:
        send(settings, event(neighbour_of(settings, mine), EventType.STARTED), *steps)
        found = follower.wait_for([mine], timeout_s=60, on_event=on_event)
    assert found == {mine: result}
    assert seen == steps


def start_cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagegen", *args],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines_until(stream: Iterator[str], last: str) -> list[str]:
    """Lines from `stream` up to the one that contains `last`; each read blocks until the
    process writes a line, and ends at its exit."""
    lines = []
    for line in stream:
        lines.append(line.rstrip("\n"))
        if last in line:
            return lines
    raise AssertionError(f"the output ended before {last!r}: {lines}")


def test_watch_shows_progress_then_the_result(settings: Settings) -> None:
    mine = new_request_id()
    estimate = datetime(2031, 5, 1, 12, 0, 5, tzinfo=UTC)
    watching = start_cli(settings, "watch", mine, "--timeout", "120")
    assert watching.stderr is not None
    try:
        # Written once it is watching: the rest of the output is live.
        assert lines_until(watching.stderr, "watching") == [f"watching {mine}"]
        send(
            settings,
            event(mine, EventType.ADMITTED, queue_position=2, estimated_start_at=estimate),
            event(mine, EventType.STARTED, worker_id="w-1"),
            progress(mine, 1, 2),
            progress(mine, 2, 2),
        )
        shown = lines_until(watching.stderr, "step 2/2")
        send(settings, succeeded(mine), event(mine, EventType.FINISHED, status=Status.SUCCEEDED))
        out, err = watching.communicate(timeout=120)
    finally:
        watching.kill()
    assert watching.returncode == 0, out + err
    assert [line.split(" ", 1)[1] for line in shown] == [
        "queued, 2 ahead, expected to start at 12:00:05 UTC",
        "rendering on w-1",
        "step 1/2",
        "step 2/2",
    ]
    assert out.splitlines()[0] == f"{mine} succeeded"
    assert f"object: s3://images/v1/wes/{mine}.png" in out


def test_watch_prints_a_result_already_there_and_exits_1_when_canceled(
    settings: Settings,
) -> None:
    mine = new_request_id()
    canceled = succeeded(mine).model_copy(
        update={"status": Status.CANCELED, "reason": Reason.CANCELED, "object_key": None}
    )
    send(settings, event(mine, EventType.ADMITTED), canceled)
    watched = imagegen(settings, "watch", mine, "--json", "--timeout", "120")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    printed = json.loads(watched.stdout)
    assert (printed["status"], printed["reason"], printed["url"]) == ("canceled", "canceled", None)
    assert "queued" in watched.stderr


def test_watch_gives_up_after_its_timeout_and_refuses_a_bad_id(settings: Settings) -> None:
    waited = imagegen(settings, "watch", new_request_id(), "--timeout", "2")
    assert waited.returncode == 2
    assert "no result within 2s" in waited.stderr
    refused = imagegen(settings, "watch", "job-17")
    assert refused.returncode == 2
    assert "is not a request id" in refused.stderr


def test_submit_wait_shows_progress_then_the_result(settings: Settings) -> None:
    user = f"submitter-{new_request_id().lower()[-8:]}"
    waiting = start_cli(
        settings, "submit", "a fern", "-u", user, "--steps", "3", "--wait", "--json"
    )
    assert waiting.stderr is not None
    try:
        (request,) = requests_of(settings, user)
        mine = request.request_id
        send(settings, event(mine, EventType.ADMITTED, queue_position=0))
        send(settings, *(progress(mine, step, 3) for step in (1, 2, 3)))
        shown = lines_until(waiting.stderr, "step 3/3")
        send(settings, succeeded(mine, user))
        out, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, out + err
    assert shown[0] == f"submitted {mine}, waiting for the processor"
    assert [line.split(" ", 1)[1] for line in shown[1:]] == [
        "queued, 0 ahead",
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]
    result = json.loads(out)  # progress went to stderr: stdout is the result alone
    assert (result["request_id"], result["status"]) == (mine, "succeeded")
    assert result["url"].startswith("http://")


def requests_of(settings: Settings, user: str) -> list[GenerationRequest]:
    def mine(messages: list[Message]) -> bool:
        return any(m.key() == user.encode() for m in messages)

    messages = read_topic(settings, REQUESTS, mine, timeout_s=120)
    return [decode(GenerationRequest, m.value()) for m in messages if m.key() == user.encode()]


def test_cancel_publishes_a_cancellation_and_says_what_follows(settings: Settings) -> None:
    mine = new_request_id()
    sent = imagegen(settings, "cancel", mine, "--user", "wes", "--json")
    assert sent.returncode == 0, sent.stderr
    printed = decode(CancelRequest, sent.stdout.strip().encode())
    assert (printed.request_id, printed.user_id) == (mine, "wes")

    def found(messages: list[Message]) -> bool:
        return any(m.key() == mine.encode() for m in messages)

    (record,) = [m for m in read_topic(settings, CANCELLATIONS, found) if m.key() == mine.encode()]
    assert decode(CancelRequest, record.value()) == printed

    told = imagegen(settings, "cancel", mine, "-u", "wes")
    assert told.returncode == 0, told.stderr
    assert f"cancellation of {mine} by wes" in told.stdout
    assert "the result will say canceled" in told.stdout
    assert f"imagegen watch {mine}" in told.stdout


def test_cancel_refuses_a_bad_user_before_sending(settings: Settings) -> None:
    refused = imagegen(settings, "cancel", new_request_id(), "--user", "no spaces")
    assert refused.returncode == 2
    assert "user_id" in refused.stderr


@pytest.mark.parametrize(
    ("update", "words"),
    [
        (
            {
                "type": EventType.ADMITTED,
                "queue_position": 3,
                "estimated_start_at": datetime(2031, 1, 1, 9, 30, tzinfo=UTC),
            },
            "queued, 3 ahead, expected to start at 09:30:00 UTC",
        ),
        ({"type": EventType.ADMITTED}, "queued"),
        ({"type": EventType.STARTED}, "rendering"),
        ({"type": EventType.PROGRESS, "step": 0, "steps": 25}, "step 0/25"),
        ({"type": EventType.FINISHED, "status": Status.EXPIRED}, "finished: expired"),
    ],
)
def test_describe_says_where_a_request_stands(update: dict[str, object], words: str) -> None:
    assert describe(event(new_request_id(), **update)) == words


def test_on_a_terminal_progress_is_a_live_bar() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    mine = new_request_id()
    with ProgressView(console, "waiting") as view:
        view.show(event(mine, EventType.STARTED, worker_id="w-2"))
        view.show(progress(mine, 2, 4))
    drawn = screen.getvalue()
    assert "rendering on w-2" in drawn
    assert "step 2/4" in drawn and "2/4" in drawn
    assert "\x1b[" in drawn  # redrawn in place, not printed line by line
