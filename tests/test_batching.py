"""Dynamic batching: what batches together, and when a short batch waits for company."""

from __future__ import annotations

import math
import time

import pytest

from imagegen.consumers.batching import ArrivalRate, Batcher


def test_a_steady_stream_is_measured_at_its_rate() -> None:
    rate = ArrivalRate(horizon_s=1.0)
    for i in range(400):
        rate.observe(i / 40)
    assert rate.per_second(10.0) == pytest.approx(40, rel=0.05)


def test_a_burst_counts_in_full_then_fades() -> None:
    rate = ArrivalRate(horizon_s=1.0)
    for _ in range(20):
        rate.observe(3.0)
    assert rate.per_second(3.0) == pytest.approx(20)
    assert rate.per_second(4.0) == pytest.approx(20 / math.e)


def test_an_arrival_stamped_earlier_counts_as_the_latest() -> None:
    rate = ArrivalRate(horizon_s=1.0)
    rate.observe(5.0)
    rate.observe(4.5)  # put by another thread, taken later
    assert rate.per_second(5.0) == pytest.approx(2)


def with_late_arrival(late: str, max_batch: int, max_wait_s: float) -> Batcher[str]:
    """A batcher, keyed by first letter, that `late` reaches while its next batch is being
    formed: a batcher asks for the first item's key before it decides whether to wait."""
    pending = [late]

    def key(item: str) -> str:
        if pending:
            batcher.put(pending.pop())
        return item[0]

    batcher: Batcher[str] = Batcher(key, max_batch, max_wait_s)
    return batcher


def test_compatible_items_batch_and_incompatible_ones_keep_their_place() -> None:
    batcher: Batcher[str] = Batcher(lambda item: item[0], max_batch=3, max_wait_s=0)
    for item in ("a1", "b1", "a2", "a3", "a4", "b2"):
        batcher.put(item)
    assert batcher.next_batch(1) == ["a1", "a2", "a3"]
    assert batcher.next_batch(1) == ["b1", "b2"]
    assert batcher.next_batch(1) == ["a4"]
    assert batcher.next_batch(0.01) == []


def test_under_dense_traffic_a_short_batch_waits_for_company() -> None:
    # 25 arrivals in the last second: more than one per 50 ms wait.
    batcher = with_late_arrival("a-late", max_batch=26, max_wait_s=0.05)
    early = [f"a{i}" for i in range(25)]
    for item in early:
        batcher.put(item)
    # Full once the late item arrives, so it returns at once; without the wait it would
    # hold the early ones only.
    assert batcher.next_batch(1) == [*early, "a-late"]


def test_under_sparse_traffic_a_short_batch_runs_at_once() -> None:
    # One arrival in the last second is far fewer than one per 0.5 s wait.
    batcher = with_late_arrival("a2", max_batch=2, max_wait_s=0.5)
    batcher.put("a1")
    assert batcher.next_batch(1) == ["a1"]
    assert batcher.next_batch(1) == ["a2"]


def test_an_item_keyed_none_batches_with_nothing_and_waits_for_no_company() -> None:
    # A wait of 30 s is always taken for a keyed item; one keyed None must not take it.
    batcher: Batcher[str] = Batcher(
        lambda item: None if item.startswith("x") else item[0], max_batch=4, max_wait_s=30
    )
    for item in ("x1", "x2", "a1", "a2", "a3", "a4"):
        batcher.put(item)
    started = time.monotonic()
    assert batcher.next_batch(1) == ["x1"]
    assert batcher.next_batch(1) == ["x2"]
    assert time.monotonic() - started < 10  # far from the 30 s a wait would take
    assert batcher.next_batch(1) == ["a1", "a2", "a3", "a4"]


def test_the_best_rank_goes_first_and_waiting_items_are_counted_by_rank() -> None:
    # Keyed and ranked by the letter: "i" items (rank 0) are interactive, "b" items (rank 1) batch.
    batcher: Batcher[str] = Batcher(
        lambda item: item[0],
        max_batch=2,
        max_wait_s=0,
        rank=lambda item: 0 if item[0] == "i" else 1,
    )
    for item in ("b1", "b2", "i1", "b3", "i2", "i3"):
        batcher.put(item)
    assert (batcher.waiting(0), batcher.waiting(1)) == (3, 3)
    assert batcher.next_batch(1) == ["i1", "i2"]  # younger than b1, b2, and first
    assert batcher.next_batch(1) == ["i3"]
    assert (batcher.waiting(0), batcher.waiting(1)) == (0, 3)
    assert batcher.next_batch(1) == ["b1", "b2"]
    batcher.put("i4")
    assert batcher.next_batch(1) == ["i4"]  # ahead of b3, which waited longer
    assert batcher.drain() == ["b3"]
    assert (batcher.waiting(0), batcher.waiting(1)) == (0, 0)


def test_drain_hands_back_everything_waiting() -> None:
    batcher: Batcher[str] = Batcher(lambda item: item[0], max_batch=1, max_wait_s=0)
    for item in ("a1", "b1", "a2"):
        batcher.put(item)
    assert batcher.next_batch(1) == ["a1"]
    assert batcher.drain() == ["b1", "a2"]
    assert batcher.drain() == []
