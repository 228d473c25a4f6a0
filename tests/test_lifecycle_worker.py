"""A job's lifecycle in the render worker: cancellations in the queue and mid-render, deadlines,
interactive work before batch work, the events that watchers see, and device time.

The integration tests run a real worker process with the `tiny` model against the embedded
stack; a 256x256 request of 100 steps renders slowly enough on a CPU to be caught mid-way.
The pure parts (the progress throttle, the fetch gate, the lifecycle's decisions) are
tested alone, with fakes where they meet Kafka.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from imagegen.consumers.jobs import Job, Polled
from imagegen.consumers.lifecycle import CanceledMidRender, Lifecycle
from imagegen.consumers.priority import FetchGate, rank, unread
from imagegen.consumers.progress import ProgressThrottle
from imagegen.consumers.storage import find, object_key
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.infra.tracing import start_span
from imagegen.schemas import (
    CancelRequest,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    Reason,
    Status,
)
from imagegen.schemas.events import EventType
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import CANCELLATIONS, RENDER, RENDER_BATCH
from tests import test_worker
from tests.helpers import events_until, produce, results_for
from tests.test_worker import SMALL

worker_factory = test_worker.worker_factory  # the fixture, shared

# Slow on a CPU: long enough to cancel mid-way, or to hold the render thread a while.
SLOW = {"width": 256, "height": 256, "steps": 100}
TIMEOUT_S = 240


def submit_to(stack: Settings, topic: str, requests: list[GenerationRequest]) -> None:
    """Put requests straight on a render topic, as the processor admits them."""
    produce(stack, topic, requests)


def cancel(stack: Settings, request: GenerationRequest, user_id: str | None = None) -> None:
    """Publish a cancellation of `request`, by its own user unless `user_id` says another."""
    cancellation = CancelRequest.new(
        request_id=request.request_id, user_id=user_id or request.user_id
    )
    produce(stack, CANCELLATIONS, [cancellation])


def has(request: GenerationRequest, type_: EventType) -> Callable[[dict], bool]:
    return lambda found: any(e.type is type_ for e in found.get(request.request_id, []))


def finished(*requests: GenerationRequest) -> Callable[[dict], bool]:
    return lambda found: all(has(r, EventType.FINISHED)(found) for r in requests)


def assert_told_in_order(events: list[JobEvent], status: Status, steps: int) -> list[int]:
    """started, then progress with rising steps up to the last, then finished; the steps."""
    types = [event.type for event in events]
    assert types[0] is EventType.STARTED and types.count(EventType.STARTED) == 1, types
    assert types[-1] is EventType.FINISHED and types.count(EventType.FINISHED) == 1, types
    assert set(types[1:-1]) == {EventType.PROGRESS}, types
    told = [event.step for event in events[1:-1]]
    assert told == sorted(set(told)), f"steps must only go up: {told}"
    assert {event.steps for event in events[1:-1]} == {steps}
    assert events[-1].status is status
    return [step for step in told if step is not None]


def the_result(found: dict[str, list[GenerationResult]], request: GenerationRequest):
    (result,) = found[request.request_id]
    return result


# ---- cancellations ---------------------------------------------------------------------


def test_a_cancel_mid_render_stops_the_batch_and_its_mate_renders_again(
    worker_factory, isolated_stack
) -> None:
    doomed = GenerationRequest.new(user_id="ann", prompt="a lighthouse", **SLOW)
    mate = GenerationRequest.new(user_id="bob", prompt="a harbour", **SLOW)
    submit_to(isolated_stack, RENDER, [doomed, mate])  # waiting together: one batch
    worker_factory("--max-batch", "2", "--max-wait-ms", "30000")
    events_until(isolated_stack, has(doomed, EventType.PROGRESS), TIMEOUT_S)
    # Queued behind the batch (another size), and canceled there.
    queued = GenerationRequest.new(user_id="cy", prompt="a buoy", **SMALL)
    submit_to(isolated_stack, RENDER, [queued])
    cancel(isolated_stack, queued)
    cancel(isolated_stack, doomed)

    found = results_for(isolated_stack, {r.request_id for r in (doomed, mate, queued)}, TIMEOUT_S)
    stopped, survived, skipped = (the_result(found, r) for r in (doomed, mate, queued))
    assert (stopped.status, stopped.reason) == (Status.CANCELED, Reason.CANCELED)
    done = re.fullmatch(r"canceled by its user after (\d+) of 100 steps", stopped.detail or "")
    assert done is not None and 0 < int(done[1]) < 100, stopped.detail
    assert stopped.device_ms is not None and stopped.device_ms > 0
    assert survived.status is Status.SUCCEEDED, survived.detail
    assert survived.batch_size == 1  # rendered again, without the canceled one
    # Its device time: its share of the stopped render (the same as the canceled one's),
    # and all of its own render.
    assert survived.timings is not None and survived.timings.render_ms is not None
    assert survived.device_ms == pytest.approx(survived.timings.render_ms + stopped.device_ms)
    assert (skipped.status, skipped.reason, skipped.device_ms) == (
        Status.CANCELED,
        Reason.CANCELED,
        None,
    )
    assert skipped.detail == "canceled by its user before its render started"
    store = ObjectStore(isolated_stack)
    assert find(store, object_key(doomed)) is None and find(store, object_key(queued)) is None
    assert find(store, object_key(mate)) is not None

    events = events_until(isolated_stack, finished(doomed, mate, queued), TIMEOUT_S)
    assert_told_in_order(events[doomed.request_id], Status.CANCELED, 100)
    assert assert_told_in_order(events[mate.request_id], Status.SUCCEEDED, 100)[-1] == 100
    assert [e.type for e in events[queued.request_id]] == [EventType.FINISHED]
    assert events[queued.request_id][0].status is Status.CANCELED


def test_foreign_and_late_cancellations_change_nothing_and_deadlines_expire_in_the_queue(
    worker_factory, isolated_stack
) -> None:
    kept = GenerationRequest.new(user_id="ann", prompt="a kite", **SMALL)
    late = GenerationRequest.new(
        user_id="bob", prompt="a stale kite", expires_at=utc_now() - timedelta(seconds=1), **SMALL
    )
    cancel(isolated_stack, kept, user_id="mallory")  # not ann's: ignored
    submit_to(isolated_stack, RENDER, [kept, late])
    worker = worker_factory()

    found = results_for(isolated_stack, {kept.request_id, late.request_id}, TIMEOUT_S)
    succeeded, expired = the_result(found, kept), the_result(found, late)
    assert succeeded.status is Status.SUCCEEDED, succeeded.detail
    assert succeeded.timings is not None and succeeded.timings.render_ms is not None
    assert succeeded.batch_size is not None
    assert succeeded.device_ms == pytest.approx(succeeded.timings.render_ms / succeeded.batch_size)
    assert (expired.status, expired.reason, expired.device_ms) == (
        Status.EXPIRED,
        Reason.DEADLINE_EXCEEDED,
        None,
    )
    assert "passed in the queue" in (expired.detail or "")
    assert find(ObjectStore(isolated_stack), object_key(late)) is None
    assert f"ignoring a cancellation of {kept.request_id}" in worker.log.read_text()

    # Canceled by its own user once finished: nothing changes.
    cancel(isolated_stack, kept)
    after = GenerationRequest.new(user_id="ann", prompt="a later kite", **SMALL)
    submit_to(isolated_stack, RENDER, [after])
    # Read until both are seen: results spread over partitions, read in no fixed order.
    found = results_for(isolated_stack, {kept.request_id, after.request_id}, TIMEOUT_S)
    assert [r.status for r in found[kept.request_id]] == [Status.SUCCEEDED]
    assert find(ObjectStore(isolated_stack), object_key(kept)) is not None
    events = events_until(isolated_stack, finished(kept, late, after), TIMEOUT_S)
    assert [e.type for e in events[late.request_id]] == [EventType.FINISHED]
    assert_told_in_order(events[kept.request_id], Status.SUCCEEDED, SMALL["steps"])


# ---- priority --------------------------------------------------------------------------


def test_batch_work_waits_behind_interactive_work(worker_factory, isolated_stack) -> None:
    holder = GenerationRequest.new(user_id="ann", prompt="hold the device", **{**SLOW, "steps": 60})
    submit_to(isolated_stack, RENDER, [holder])
    worker_factory("--max-batch", "1")
    events_until(isolated_stack, has(holder, EventType.STARTED), TIMEOUT_S)
    # While the holder renders: batch work first, then interactive work.
    batch = [
        GenerationRequest.new(user_id=f"b{i}", prompt=f"bulk {i}", priority="batch", **SMALL)
        for i in range(3)
    ]
    interactive = [
        GenerationRequest.new(user_id=f"i{i}", prompt=f"now {i}", **SMALL) for i in range(3)
    ]
    submit_to(isolated_stack, RENDER_BATCH, batch)
    submit_to(isolated_stack, RENDER, interactive)

    everyone = [holder, *batch, *interactive]
    found = results_for(isolated_stack, {r.request_id for r in everyone}, TIMEOUT_S)
    assert all(the_result(found, r).status is Status.SUCCEEDED for r in everyone)
    events = events_until(isolated_stack, finished(*everyone), TIMEOUT_S)
    started = {
        request_id: next(e.at for e in told if e.type is EventType.STARTED)
        for request_id, told in events.items()
    }
    last_interactive = max(started[r.request_id] for r in interactive)
    first_batch = min(started[r.request_id] for r in batch)
    assert last_interactive < first_batch, "batch work started while interactive work waited"
    assert assert_told_in_order(events[holder.request_id], Status.SUCCEEDED, 60)[-1] == 60


# ---- the pure parts ------------------------------------------------------------------


def test_progress_is_told_at_most_every_interval_and_always_at_the_last_step() -> None:
    throttle = ProgressThrottle(interval_s=0.5)
    told = [
        step
        for step, at in [(1, 0.0), (2, 0.1), (3, 0.4), (4, 0.6), (5, 0.7)]
        if throttle.due(step, 6, at)
    ]
    assert told == [1, 4]
    assert throttle.due(6, 6, 0.75)  # the last step, however soon


def test_progress_never_goes_back() -> None:
    # A job rendered again after its batch stopped counts its steps from 1 again.
    throttle = ProgressThrottle(interval_s=0.5)
    assert throttle.due(5, 10, 0.0)
    assert not throttle.due(3, 10, 10.0)
    assert not throttle.due(5, 10, 20.0)
    assert throttle.due(6, 10, 30.0)


class FakeConsumer:
    """The calls the fetch gate makes: an assignment, pauses, positions and watermarks. The
    worker has a consumer per topic: `of(topic)` is the one of `topic`, sharing this state."""

    def __init__(
        self,
        positions: dict[tuple[str, int], int],
        highs: dict[tuple[str, int], int],
        topic: str | None = None,
    ):
        self.positions = positions
        self.highs = highs
        self.topic = topic
        self.paused: set[tuple[str, int]] = set()

    def of(self, topic: str) -> FakeConsumer:
        view = FakeConsumer(self.positions, self.highs, topic)
        view.paused = self.paused
        return view

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.positions if self.topic in (None, t)]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions[tp.topic, tp.partition])
            for tp in partitions
        ]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        assert cached  # never a request to the broker from the poll loop
        return 0, self.highs[tp.topic, tp.partition]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update({(tp.topic, tp.partition) for tp in partitions})

    def paused_topics(self) -> set[str]:
        return {topic for topic, _ in self.paused}


def gate_for(consumer: FakeConsumer, queued: list[int]) -> FetchGate:
    return FetchGate(
        {topic: consumer.of(topic) for topic in (RENDER, RENDER_BATCH)},  # type: ignore[misc]
        max_in_flight=32,
        batch_cap=8,
        interactive_queued=lambda: queued[0],
    )


def test_batch_partitions_pause_while_interactive_work_waits() -> None:
    consumer = FakeConsumer({(RENDER, 0): 5, (RENDER_BATCH, 0): 0}, {(RENDER, 0): 5})
    queued = [0]
    gate = gate_for(consumer, queued)
    gate.update(in_flight=0, batch_in_flight=0)
    assert consumer.paused_topics() == set()
    queued[0] = 1  # an interactive job waits for the render thread
    gate.update(in_flight=1, batch_in_flight=0)
    assert consumer.paused_topics() == {RENDER_BATCH}
    queued[0] = 0
    consumer.highs[RENDER, 0] = 7  # two interactive records not handed over yet
    gate.update(in_flight=1, batch_in_flight=0)
    assert consumer.paused_topics() == {RENDER_BATCH}
    consumer.positions[RENDER, 0] = 7
    gate.update(in_flight=3, batch_in_flight=0)
    assert consumer.paused_topics() == set()


def test_batch_work_in_flight_is_capped_and_polls_cannot_overshoot_the_cap() -> None:
    consumer = FakeConsumer({(RENDER, 0): 0, (RENDER_BATCH, 0): 0}, {(RENDER, 0): 0})
    gate = gate_for(consumer, [0])
    assert gate.poll_limit(in_flight=3, batch_in_flight=3) == 5  # the cap's room, not 29
    gate.update(in_flight=8, batch_in_flight=8)
    assert consumer.paused_topics() == {RENDER_BATCH}
    assert gate.poll_limit(in_flight=8, batch_in_flight=8) == 24  # interactive room
    gate.update(in_flight=5, batch_in_flight=5)
    assert consumer.paused_topics() == {RENDER_BATCH}  # until half the cap is done
    gate.update(in_flight=4, batch_in_flight=4)
    assert consumer.paused_topics() == set()


def test_back_pressure_pauses_everything_until_half_is_done() -> None:
    consumer = FakeConsumer({(RENDER, 0): 0, (RENDER_BATCH, 0): 0}, {(RENDER, 0): 0})
    gate = gate_for(consumer, [0])
    gate.update(in_flight=32, batch_in_flight=0)
    assert consumer.paused_topics() == {RENDER, RENDER_BATCH}
    assert gate.poll_limit(in_flight=32, batch_in_flight=0) == 1  # polling goes on
    gate.update(in_flight=17, batch_in_flight=0)
    assert consumer.paused_topics() == {RENDER, RENDER_BATCH}
    gate.update(in_flight=16, batch_in_flight=0)
    assert consumer.paused_topics() == set()


def test_a_partition_added_while_its_topic_is_paused_is_paused_too() -> None:
    consumer = FakeConsumer({(RENDER, 0): 0, (RENDER_BATCH, 0): 0}, {(RENDER, 0): 0})
    gate = gate_for(consumer, [0])
    gate.update(in_flight=32, batch_in_flight=0)
    # A cooperative rebalance adds partitions, unpaused, and leaves the others as they were.
    added = [TopicPartition(RENDER, 1), TopicPartition(RENDER_BATCH, 1)]
    consumer.positions |= {(tp.topic, tp.partition): 0 for tp in added}
    consumer.highs[RENDER, 1] = 0
    gate.assigned(added)
    assert consumer.paused == {(topic, p) for topic in (RENDER, RENDER_BATCH) for p in (0, 1)}
    gate.update(in_flight=16, batch_in_flight=0)
    assert consumer.paused == set()  # and all of them are resumed together
    # librdkafka keeps a partition's pause across its revocation: one that comes back still
    # paused is resumed, as its topic is.
    returning = TopicPartition(RENDER, 2)
    consumer.positions[RENDER, 2] = 0
    consumer.highs[RENDER, 2] = 0
    consumer.paused.add((RENDER, 2))
    gate.assigned([returning])
    assert consumer.paused == set()


def test_a_partition_that_handed_nothing_over_counts_no_backlog() -> None:
    consumer = FakeConsumer({(RENDER, 0): -1001, (RENDER, 1): 4}, {(RENDER, 0): 9, (RENDER, 1): 6})
    assert unread(consumer, consumer.assignment()) == 2  # type: ignore[arg-type]
    assert rank(RENDER) < rank(RENDER_BATCH)


def job_of(**fields: Any) -> Job:
    """A job as the render thread holds it; the record itself is never read here."""
    request = GenerationRequest.new(user_id="ann", prompt="p", **{**SMALL, **fields})
    polled = Polled(RENDER, 0, 0, 0)
    return Job(None, polled, request, 0, start_span("test", []))  # type: ignore[arg-type]


def test_a_job_at_the_front_ends_canceled_or_expired_or_renders() -> None:
    canceled, fresh = job_of(), job_of()
    stale = job_of(submitted_at=utc_now() - timedelta(seconds=61))
    book = {
        canceled.request.request_id: CancelRequest.new(
            request_id=canceled.request.request_id, user_id="ann"
        )
    }
    lifecycle = Lifecycle(lambda request: book.get(request.request_id), default_ttl_s=60)
    assert lifecycle.ends_in_queue(canceled) == (
        Status.CANCELED,
        "canceled by its user before its render started",
    )
    ending = lifecycle.ends_in_queue(stale)
    assert ending is not None and ending[0] is Status.EXPIRED
    assert lifecycle.ends_in_queue(fresh) is None


def test_a_canceled_member_stops_its_render_at_the_next_step() -> None:
    jobs = [job_of(), job_of()]
    canceled: set[str] = set()
    lifecycle = Lifecycle(
        lambda request: (
            CancelRequest.new(request_id=request.request_id, user_id="ann")
            if request.request_id in canceled
            else None
        )
    )
    on_step = lifecycle.watch(jobs)
    on_step(1, 2)
    canceled.add(jobs[1].request.request_id)
    with pytest.raises(CanceledMidRender) as stopped:
        on_step(2, 2)
    assert (stopped.value.step, stopped.value.steps, stopped.value.jobs) == (2, 2, [jobs[1]])


def test_started_marks_each_job_once() -> None:
    job = job_of()
    Lifecycle().started([job], 1000)
    Lifecycle().started([job], 2000)
    assert job.render_started_ms == 1000
