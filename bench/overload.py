"""Overload benchmark: three times the worker's capacity, with deadlines and cancellations.

One `imagegen processor` and one `imagegen worker` run as child processes on a private
embedded stack, with rate limits that admit everything, so that only load shedding, expiry
and cancellation keep work off the model. Warm-up requests of both shapes must come back
first. Then, in the same run:

1. Capacity: a burst of `capacity_requests` requests of the benchmark's shape (`tiny`, 64x64,
   8 steps, interactive, a deadline far off) is published at once, closed loop. Capacity is
   the results after the first one's batch, per second between the first result and the
   last: what the worker sustains with full batches.
2. Overload: requests are published open loop at `load_factor` x capacity for `duration_s`,
   request i at t0 + i / rate by the wall clock. Two of every three are `interactive`, with
   `expires_at` = publish + `interactive_ttl_s` (a few batches of queue: shedding and
   expiry decide which ones run); one in three is `batch`, with `batch_ttl_s`. Interactive
   work alone is twice what the worker renders, so batch work waits, and mostly expires.
3. Cancellations: one request in `cancel_every` is a *mid-render* sample, interactive with
   the batch deadline (so that shedding and expiry leave enough of them), rendered with
   `cancel_steps` steps so that it is caught mid-way: at its first `progress` event its
   cancel is published. Another in `cancel_every` is a *queued* sample, canceled at
   its `admitted` event. Whether a cancel came mid-render is read afterwards from the events:
   a `started` event before the cancel's publish. Cancel latency runs from the start of the
   cancel's publish (a `CancelRequest` on `imagegen.cancellations`, key request_id) to the
   arrival of the `canceled` result at a `ResultSubscriber`. The target is at most one
   step + 200 ms; in steps, a latency is that over the step time measured in the same
   window: one request in 3 x `cancel_every` is a *step sample*, like a mid-render one but
   never canceled, with `cancel_steps` + 1 steps (one more, so that it never shares a batch with
   a cancel sample: a cancel stops its whole batch, and the other members render again).
   Its step time is the gap between its first and last `progress` events over the steps
   between (the worker sends about one every half second). With no step sample succeeded,
   the warm-up's two, on an idle worker, stand in.

Results are read by a `ResultSubscriber` created before the first publish, in polls of at
most `RESULT_POLL_S`; `JobEvent`s by a plain consumer assigned every `imagegen.events`
partition from its end, in a thread, which also publishes the cancels. Every request must
get an answer (succeeded, overloaded, expired or canceled) within `batch_ttl_s` + `drain_s`
of the last publish; one without, or a `failed` one, is a failure, and a run with failures
meets no target.

Figures:
- interactive end-to-end latency of succeeded requests (publish start to result), beside
  the interactive deadline; counts by priority, status and reason; goodput against capacity;
- `overloaded` rejections: how many and how fast (publish start to result);
- renders started after their deadline: a `started` event whose `at` is past the
  request's `expires_at` (target 0; None when no `started` event was seen at all);
- device-seconds (the results' `device_ms`) on requests that end expired, or canceled
  before their render started (target 0). The device time of a mid-render cancel is
  reported beside it and not held to 0: it was spent before the cancel was asked for, and
  what came after is bounded by the cancel latency target;
- cancel latency p99 in ms and in steps, and its ratio to the target (at most 1).

Run: `python -m bench.overload [--quick] [--duration S] [--load X]`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition

from bench.command import exit_on_sigterm, overridden, positive, run_alone
from bench.pipeline import (
    PUBLISH_THREADS,
    RESULT_POLL_S,
    OpenLoop,
    Pipeline,
    PipelineOptions,
    add_worker_arguments,
    percentiles,
    running_pipeline,
    schedule_start,
    worker_overrides,
)
from imagegen.infra.kafka import consume_available, make_consumer, make_producer
from imagegen.infra.settings import Settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import (
    CancelRequest,
    EventType,
    GenerationResult,
    JobEvent,
    Reason,
    Status,
    decode,
    encode,
    new_request_id,
)
from imagegen.schemas.errors import ImagegenError, InvalidMessage
from imagegen.schemas.topics import CANCELLATIONS, EVENTS

#: The cancel latency target is one denoising step + this.
CANCEL_ALLOWANCE_MS = 200.0


@dataclass(frozen=True)
class Options(PipelineOptions):
    # On one core at 64x64, about 15-30 ms a step alone and 45-50 in a batch of 4 (measured
    # on a busy 2-core machine): a render of some substance, and a capacity of a few
    # requests per second, measurable in a few seconds.
    steps: int = 8
    #: The mid-render cancel samples' steps: long enough that the cancel lands mid-way.
    cancel_steps: int = 24
    #: Requests of the closed-loop burst that measures capacity.
    capacity_requests: int = 80
    #: Offered load over capacity.
    load_factor: float = 3.0
    #: Seconds of open-loop publishing at load_factor x capacity.
    duration_s: float = 30.0
    #: Time to live (expires_at - publish) of interactive and of batch requests. Interactive
    #: work waits at most a few batches; batch work longer, but interactive work comes first.
    interactive_ttl_s: float = 2.0
    batch_ttl_s: float = 10.0
    #: One request in this many is a mid-render cancel sample, another a queued one.
    cancel_every: int = 20
    #: After the last publish, answers are awaited for batch_ttl_s + this.
    drain_s: float = 30.0


DEFAULT = Options()
QUICK = replace(DEFAULT, capacity_requests=40, duration_s=10.0)

#: The capacity burst's requests may wait this long: the burst must all be rendered.
CAPACITY_TTL_S = 300.0


class Role(StrEnum):
    """What a request of the overload window is for, beside load."""

    MID_RENDER = "mid_render"  # canceled at its first progress event
    QUEUED = "queued"  # canceled at its admitted event
    STEP_SAMPLE = "step_sample"  # never canceled: its progress events time a step


CANCELED_ROLES = (Role.MID_RENDER, Role.QUEUED)
#: Interactive, with the batch deadline: measuring instruments more than load.
SAMPLE_ROLES = (Role.MID_RENDER, Role.STEP_SAMPLE)
#: One request in STEP_SAMPLE_EVERY x cancel_every is a step sample.
STEP_SAMPLE_EVERY = 3


@dataclass
class Track:
    """One request, as the benchmark saw it: published, its events, its cancel, its results."""

    request_id: str
    user_id: str
    priority: str
    steps: int
    ttl_s: float
    scheduled: float = 0.0  # perf_counter seconds
    role: Role | None = None
    published_wall: float = 0.0  # time.time() when publish began
    deadline_wall: float = 0.0  # expires_at, as time.time()
    publish_ms: float | None = None
    error: str | None = None
    admitted_at: float | None = None  # event times: the sender's clock (this host)
    started_at: float | None = None
    started_events: int = 0
    progress: list[tuple[int, float]] = field(default_factory=list)  # (step, at)
    cancel_sent_wall: float | None = None
    cancel_error: str | None = None
    results: list[tuple[GenerationResult, float]] = field(default_factory=list)  # arrival

    @property
    def result(self) -> GenerationResult | None:
        return self.results[0][0] if self.results else None

    @property
    def answered_wall(self) -> float:
        return self.results[0][1]

    def fields(self, options: Options, prompt: str) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "prompt": prompt,
            "model": options.model,
            "width": options.width,
            "height": options.height,
            "steps": self.steps,
            "priority": self.priority,
            "expires_at": datetime.now(UTC) + timedelta(seconds=self.ttl_s),
        }


# ---- publishing, results, events -------------------------------------------------------


def publish(publisher: RequestPublisher, options: Options, track: Track) -> None:
    fields = track.fields(options, f"overload {track.request_id}")
    track.deadline_wall = fields["expires_at"].timestamp()
    track.published_wall = time.time()
    started = time.perf_counter()
    try:
        publisher.publish(**fields)
    except ImagegenError as error:
        track.error = f"{type(error).__name__}: {error}"
        return
    track.publish_ms = (time.perf_counter() - started) * 1000


def collect(pipeline: Pipeline, tracks: dict[str, Track], until: Callable[[], bool]) -> None:
    """Every result for `tracks` as it arrives, each timed on arrival, until each has one or
    `until()` says to stop waiting; the children must stay up all along. A request's later
    results are kept too: a second answer to one request is a failure."""

    def record(result: GenerationResult) -> None:
        track = tracks.get(result.request_id)
        if track is not None:
            track.results.append((result, time.time()))

    wanted = list(tracks)
    while not until():
        if all(track.results or track.error for track in tracks.values()):
            return
        # Every id every time: `on_result` then sees a request's second answer too.
        pipeline.poll_results(wanted, record)


def publish_all(publisher: RequestPublisher, options: Options, tracks: list[Track]) -> None:
    with ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="overload-publish") as pool:
        for track in tracks:
            pool.submit(publish, publisher, options, track)


def closed_loop(
    pipeline: Pipeline, options: Options, tracks: list[Track], timeout_s: float, what: str
) -> None:
    """Publish `tracks` at once and wait until each has succeeded."""
    deadline = time.monotonic() + timeout_s
    publish_all(pipeline.publisher, options, tracks)
    collect(pipeline, {t.request_id: t for t in tracks}, lambda: time.monotonic() > deadline)
    missing = [t for t in tracks if not t.results]
    if missing:
        raise RuntimeError(f"{len(missing)} {what} request(s) had no result within {timeout_s:g} s")
    bad = [r for t in tracks if (r := t.result) is not None and r.status is not Status.SUCCEEDED]
    if bad:
        raise RuntimeError(
            f"a {what} request did not succeed: {bad[0].status} {bad[0].reason} {bad[0].detail}"
        )


class EventReader:
    """Reads `imagegen.events` from its end into the tracks, in a thread, and publishes each
    cancel sample's cancel at its trigger event."""

    def __init__(self, settings: Settings, tracks: dict[str, Track]) -> None:
        self._tracks = tracks
        self._consumer = make_consumer(
            settings, group_id="bench-overload-events", **{"enable.auto.commit": False}
        )
        partitions = self._consumer.list_topics(EVENTS, timeout=10).topics[EVENTS].partitions
        ends = [
            TopicPartition(
                EVENTS,
                p,
                self._consumer.get_watermark_offsets(TopicPartition(EVENTS, p), timeout=10)[1],
            )
            for p in sorted(partitions)
        ]
        self._consumer.assign(ends)
        self._producer = make_producer(settings)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overload-events", daemon=True)
        self.unreadable = 0
        self.events = 0
        self.failure: BaseException | None = None

    def __enter__(self) -> EventReader:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping.set()
        self._thread.join()
        self._producer.flush(10)
        self._consumer.close()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for message in consume_available(self._consumer, 500, RESULT_POLL_S):
                    if message.error() is None:
                        self._record(message)
                self._producer.poll(0)
        except BaseException as error:  # surfaced by check()
            self.failure = error

    def check(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"the event reader failed: {self.failure!r}") from self.failure

    def _record(self, message: Message) -> None:
        try:
            event = decode(JobEvent, message.value())
        except InvalidMessage:
            self.unreadable += 1
            return
        track = self._tracks.get(event.request_id)
        if track is None:
            return
        self.events += 1
        at = event.at.timestamp()
        if event.type is EventType.ADMITTED:
            track.admitted_at = track.admitted_at or at
            if track.role is Role.QUEUED:
                self._cancel(track)
        elif event.type is EventType.STARTED:
            track.started_events += 1
            track.started_at = track.started_at or at
        elif event.type is EventType.PROGRESS and event.step is not None:
            track.progress.append((event.step, at))
            if track.role is Role.MID_RENDER and event.step >= 1:
                self._cancel(track)

    def _cancel(self, track: Track) -> None:
        if track.cancel_sent_wall is not None:
            return
        cancel = CancelRequest.new(request_id=track.request_id, user_id=track.user_id)

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                track.cancel_error = error.str()

        track.cancel_sent_wall = time.time()
        self._producer.produce(
            CANCELLATIONS, key=cancel.kafka_key, value=encode(cancel), on_delivery=delivered
        )
        self._producer.poll(0)


# ---- the requests ----------------------------------------------------------------------


def warm_up_tracks(options: Options) -> list[Track]:
    """One request per user, and two of the step samples' shape."""
    tracks = [
        Track(new_request_id(), f"overload-user-{u}", "interactive", options.steps, CAPACITY_TTL_S)
        for u in range(options.users)
    ]
    sample_steps = steps_of(options, Role.STEP_SAMPLE)
    return tracks + [
        Track(new_request_id(), f"overload-user-{u}", "interactive", sample_steps, CAPACITY_TTL_S)
        for u in range(2)
    ]


def capacity_tracks(options: Options) -> list[Track]:
    return [
        Track(
            new_request_id(),
            f"overload-user-{i % options.users}",
            "interactive",
            options.steps,
            CAPACITY_TTL_S,
        )
        for i in range(options.capacity_requests)
    ]


def role_of(options: Options, i: int) -> Role | None:
    every = options.cancel_every
    if i % every == 0:
        return Role.MID_RENDER
    if i % every == every // 2:
        return Role.QUEUED
    if i % (STEP_SAMPLE_EVERY * every) == every // 4:
        return Role.STEP_SAMPLE
    return None


def steps_of(options: Options, role: Role | None) -> int:
    if role is Role.MID_RENDER:
        return options.cancel_steps
    # One step more: never in a batch with a cancel sample, whose cancel stops the batch
    # (and renders its other members again).
    if role is Role.STEP_SAMPLE:
        return options.cancel_steps + 1
    return options.steps


def overload_tracks(options: Options, rate_per_s: float) -> list[Track]:
    count = round(rate_per_s * options.duration_s)
    t0 = schedule_start()
    tracks = []
    for i in range(count):
        role = role_of(options, i)
        # Two in three interactive. The mid-render and step samples are measuring
        # instruments: interactive, so that they run soon, with the batch deadline, so that
        # shedding and expiry leave enough of them to measure.
        sample = role in SAMPLE_ROLES
        interactive = sample or i % 3 != 2
        tracks.append(
            Track(
                request_id=new_request_id(),
                user_id=f"overload-user-{i % options.users}",
                priority="interactive" if interactive else "batch",
                steps=steps_of(options, role),
                ttl_s=options.batch_ttl_s
                if sample or not interactive
                else options.interactive_ttl_s,
                scheduled=t0 + i / rate_per_s,
                role=role,
            )
        )
    return tracks


# ---- figures ---------------------------------------------------------------------------


def capacity_of(tracks: list[Track]) -> dict[str, float]:
    """Results per second after the first result's batch: what the worker sustains."""
    arrivals = sorted(t.answered_wall for t in tracks)
    first_batch = next(
        r for t in tracks if (r := t.result) is not None and t.answered_wall == arrivals[0]
    )
    after_first = len(arrivals) - (first_batch.batch_size or 1)
    span_s = arrivals[-1] - arrivals[0]
    if after_first < 1 or span_s <= 0:
        raise RuntimeError("the capacity burst came back in one batch: raise capacity_requests")
    batches = [r.batch_size or 1 for t in tracks if (r := t.result) is not None]
    return {
        "requests": len(tracks),
        "per_s": round(after_first / span_s, 2),
        "span_s": round(span_s, 2),
        "mean_batch_size": round(sum(batches) / len(batches), 2),
    }


def outcome(result: GenerationResult) -> str:
    if result.reason is None or result.status in (Status.CANCELED, Status.EXPIRED):
        return result.status.value
    return f"{result.status.value}: {result.reason.value}"


def step_ms_of(tracks: list[Track], steps: int) -> float | None:
    """The median step time of the succeeded requests with `steps`, each from its first and
    last progress events (the worker throttles them: a job's first step, about one every
    half second, and its last)."""
    times = []
    for track in tracks:
        result = track.result
        if track.steps != steps or result is None or result.status is not Status.SUCCEEDED:
            continue
        points = sorted(track.progress)
        if len(points) >= 2 and points[-1][0] > points[0][0]:
            (first, first_at), (last, last_at) = points[0], points[-1]
            times.append((last_at - first_at) / (last - first) * 1000)
    return round(median(times), 1) if times else None


def summarise(
    options: Options,
    capacity: dict[str, float],
    rate_per_s: float,
    tracks: list[Track],
    warm_up: list[Track],
    reader: EventReader,
    warm_up_s: float,
) -> dict[str, object]:
    failures: Counter[str] = Counter()
    # The mid-render and step samples apart: they have the batch deadline.
    by_group: dict[str, Counter[str]] = {
        "interactive": Counter(),
        "batch": Counter(),
        "samples": Counter(),
    }
    device_ms: dict[str, float] = {}
    for track in tracks:
        result = track.result
        if track.error is not None:
            failures["publish error"] += 1
        elif result is None:
            failures["no result"] += 1
        else:
            group = "samples" if track.role in SAMPLE_ROLES else track.priority
            by_group[group][outcome(result)] += 1
            if result.status in (Status.FAILED, Status.DUPLICATE):
                failures[outcome(result)] += 1
            if len({r.status for r, _ in track.results}) > 1:
                failures["conflicting results"] += 1
            status = result.status.value
            device_ms[status] = device_ms.get(status, 0.0) + (result.device_ms or 0.0)
        if track.cancel_error is not None:
            failures["cancel publish error"] += 1

    def answered(status: Status, priority: str | None = None) -> list[Track]:
        return [
            t
            for t in tracks
            if (r := t.result) is not None
            and r.status is status
            and (priority is None or t.priority == priority)
        ]

    def e2e_ms(group: list[Track]) -> list[float]:
        return [(t.answered_wall - t.published_wall) * 1000 for t in group]

    interactive = [t for t in answered(Status.SUCCEEDED, "interactive") if t.role is None]
    interactive_e2e = percentiles(e2e_ms(interactive))
    overloaded = [
        t for t in tracks if (r := t.result) is not None and r.reason is Reason.OVERLOADED
    ]
    retry_after = [
        r.retry_after_ms for t in overloaded if (r := t.result) and r.retry_after_ms is not None
    ]

    # Renders started after their deadline: from the `started` events.
    started = [t for t in tracks if t.started_at is not None]
    late = [t for t in started if t.started_at is not None and t.started_at > t.deadline_wall]

    # Cancels: mid-render when the render had started before the cancel was published.
    def mid_render(track: Track) -> bool:
        sent = track.cancel_sent_wall
        return sent is not None and track.started_at is not None and track.started_at < sent

    canceled = answered(Status.CANCELED)
    canceled_mid = [t for t in canceled if mid_render(t)]
    canceled_before = [t for t in canceled if not mid_render(t)]
    expired = answered(Status.EXPIRED)

    def device_s(group: list[Track]) -> float:
        return round(sum((r.device_ms or 0.0) for t in group if (r := t.result)) / 1000, 3)

    def cancel_ms(group: list[Track]) -> list[float]:
        return [(t.answered_wall - t.cancel_sent_wall) * 1000 for t in group if t.cancel_sent_wall]

    # The step time at the cancel samples' shape (give or take a step), under the same
    # load; from the warm-up's, on an idle worker, when no step sample succeeded.
    sample_steps = steps_of(options, Role.STEP_SAMPLE)
    step_ms, step_ms_source = step_ms_of(tracks, sample_steps), "overload"
    if step_ms is None:
        step_ms, step_ms_source = step_ms_of(warm_up, sample_steps), "warm-up"
    mid_latency = percentiles(cancel_ms(canceled_mid)) or _one(cancel_ms(canceled_mid))
    p99 = mid_latency.get("p99")
    target_ms = step_ms + CANCEL_ALLOWANCE_MS if step_ms else None
    sent = [t for t in tracks if t.cancel_sent_wall is not None]
    cancels = {
        "samples": {role.value: sum(t.role is role for t in tracks) for role in Role},
        "sent": {role.value: sum(t.role is role for t in sent) for role in CANCELED_ROLES},
        "canceled_mid_render": len(canceled_mid),
        "canceled_before_start": len(canceled_before),
        # A cancel sent whose request still ended otherwise (it finished first, or expired).
        "sent_but_not_canceled": dict(
            Counter(outcome(r) for t in sent if (r := t.result) and r.status is not Status.CANCELED)
        ),
    }
    window_end = max((t.published_wall for t in tracks), default=0.0)
    window_start = min((t.published_wall for t in tracks), default=0.0)
    span_s = window_end - window_start
    good_in_window = sum(
        1 for t in answered(Status.SUCCEEDED) if window_start <= t.answered_wall <= window_end
    )
    goodput = good_in_window / span_s if span_s else None
    # What the model did during the window: renders started in it, by kind of request, and
    # their device time over the window's length.
    in_window = [
        t for t in tracks if t.started_at is not None and window_start <= t.started_at <= window_end
    ]
    started_in_window = Counter(
        "samples" if t.role in SAMPLE_ROLES else t.priority for t in in_window
    )
    busy_s = sum((r.device_ms or 0.0) for t in in_window if (r := t.result)) / 1000
    return {
        "options": asdict(options),
        "warm_up_s": round(warm_up_s, 1),
        "capacity": capacity,
        "capacity_per_s": capacity["per_s"],
        "offered_per_s": round(rate_per_s, 2),
        "achieved_rate_per_s": round((len(tracks) - 1) / span_s, 2) if span_s else None,
        "requests": len(tracks),
        "outcomes": {name: dict(counts) for name, counts in by_group.items()},
        "failures": failures.total(),
        "failure_causes": dict(failures),
        "interactive_ttl_ms": options.interactive_ttl_s * 1000,
        "interactive_e2e_ms": interactive_e2e,
        "interactive_e2e_p99_ms": interactive_e2e.get("p99"),
        "batch_e2e_ms": percentiles(e2e_ms([t for t in answered(Status.SUCCEEDED, "batch")])),
        "goodput_per_s": round(goodput, 2) if goodput is not None else None,
        "goodput_vs_capacity": round(goodput / capacity["per_s"], 3) if goodput else None,
        "started_in_window": dict(started_in_window),
        "device_busy_in_window": round(busy_s / span_s, 3) if span_s else None,
        "overloaded": len(overloaded),
        "overloaded_answer_ms": percentiles(e2e_ms(overloaded)),
        "overloaded_answer_p99_ms": percentiles(e2e_ms(overloaded)).get("p99"),
        "retry_after_ms_p50": median(retry_after) if retry_after else None,
        "started_events": len(started),
        "succeeded_without_started_event": sum(
            1 for t in answered(Status.SUCCEEDED) if t.started_at is None
        ),
        # None, not 0, when no render was seen starting: a worker without events proves nothing.
        "renders_started_after_deadline": len(late) if started else None,
        "device_s_by_status": {k: round(v / 1000, 3) for k, v in device_ms.items()},
        "device_s_canceled_or_expired": device_s(canceled_before + expired) if started else None,
        "device_s_canceled_mid_render": device_s(canceled_mid),
        "cancels": cancels,
        "step_ms": step_ms,
        "step_ms_source": step_ms_source if step_ms is not None else None,
        "step_ms_request_shape": step_ms_of(tracks, options.steps),
        "cancel_latency_ms": mid_latency,
        "cancel_latency_p99_ms": p99,
        "cancel_latency_p99_steps": round(p99 / step_ms, 2) if p99 and step_ms else None,
        "cancel_target_ms": round(target_ms, 1) if target_ms else None,
        "cancel_latency_p99_vs_target": round(p99 / target_ms, 3) if p99 and target_ms else None,
        "cancel_before_start_latency_ms": percentiles(cancel_ms(canceled_before))
        or _one(cancel_ms(canceled_before)),
        "events_read": reader.events,
        "unreadable_events": reader.unreadable,
    }


def _one(values: list[float]) -> dict[str, float]:
    """A single value as every percentile (percentiles() needs two)."""
    return (
        {k: round(values[0], 1) for k in ("p50", "p95", "p99", "max")} if len(values) == 1 else {}
    )


# ---- the run ---------------------------------------------------------------------------


def run(options: Options, scratch: Path) -> dict[str, object]:
    """The benchmark; the children's logs go to `scratch`."""
    watched: dict[str, Track] = {}  # what the event reader records, phase by phase
    with (
        running_pipeline(options, scratch) as pipeline,
        EventReader(pipeline.settings, watched) as reader,
    ):

        def phase(tracks: list[Track]) -> dict[str, Track]:
            by_id = {t.request_id: t for t in tracks}
            watched.update(by_id)
            return by_id

        started = time.monotonic()
        warm_up = warm_up_tracks(options)
        phase(warm_up)
        closed_loop(pipeline, options, warm_up, options.warm_up_timeout_s, "warm-up")
        warm_up_s = time.monotonic() - started
        burst = capacity_tracks(options)
        phase(burst)
        closed_loop(pipeline, options, burst, CAPACITY_TTL_S, "capacity")
        capacity = capacity_of(burst)
        rate = options.load_factor * capacity["per_s"]
        tracks = overload_tracks(options, rate)
        by_id = phase(tracks)
        send = partial(publish, pipeline.publisher, options)
        drain_s = options.batch_ttl_s + options.drain_s
        with OpenLoop(tracks, send, drain_s, "overload") as loop:

            def done() -> bool:
                reader.check()
                return loop.done_draining()

            collect(pipeline, by_id, done)
        # A second answer to a request would come soon after the first.
        collect(pipeline, by_id, _after(1.0))
        reader.check()
    return summarise(options, capacity, rate, tracks, warm_up, reader, warm_up_s)


def _after(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


def options_from(args: argparse.Namespace) -> Options:
    options = QUICK if args.quick else DEFAULT
    overrides = {
        "duration_s": args.duration,
        "load_factor": args.load,
        "capacity_requests": args.capacity_requests,
        "interactive_ttl_s": args.interactive_ttl,
        "batch_ttl_s": args.batch_ttl,
        **worker_overrides(args),
    }
    return overridden(options, overrides)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 10 s window instead of 30 s")
    parser.add_argument("--duration", type=float, help="seconds of overload (default 30)")
    parser.add_argument("--load", type=float, help="offered load over capacity (default 3)")
    parser.add_argument("--capacity-requests", type=positive, help="the burst (default 80)")
    parser.add_argument("--interactive-ttl", type=float, help="seconds (default 2)")
    parser.add_argument("--batch-ttl", type=float, help="seconds (default 10)")
    add_worker_arguments(parser)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    run_alone("overload", lambda scratch: run(options_from(args), scratch), args.out)


if __name__ == "__main__":
    main()
