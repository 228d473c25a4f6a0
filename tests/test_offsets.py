"""The offset tracker: what is safe to commit while a partition's work finishes out of order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imagegen.consumers.offsets import OffsetTracker


def tracker_with(partition, offsets):
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.started(partition, offset)
    return tracker


def test_finishing_the_only_offset_commits_one_past_it():
    tracker = tracker_with(0, [7])

    assert tracker.finished(0, 7) == 8


def test_commit_offset_waits_for_the_lowest_unfinished_offset():
    tracker = tracker_with(0, [0, 1, 2])

    assert tracker.finished(0, 1) is None
    assert tracker.finished(0, 2) is None
    assert tracker.finished(0, 0) == 3


def test_commit_offset_moves_to_the_next_unfinished_offset():
    tracker = tracker_with(0, [0, 1, 2, 3])
    tracker.finished(0, 2)

    assert tracker.finished(0, 0) == 1
    assert tracker.finished(0, 1) == 3
    assert tracker.finished(0, 3) == 4


def test_commit_offset_skips_gaps_between_offsets():
    tracker = tracker_with(0, [10, 15, 20])

    assert tracker.finished(0, 10) == 15
    assert tracker.finished(0, 20) is None
    assert tracker.finished(0, 15) == 21


def test_offsets_started_after_a_finish_hold_the_commit_back():
    tracker = tracker_with(0, [0])
    assert tracker.finished(0, 0) == 1

    tracker.started(0, 1)
    tracker.started(0, 2)

    assert tracker.finished(0, 2) is None
    assert tracker.finished(0, 1) == 3


def test_partitions_are_tracked_independently():
    tracker = OffsetTracker()
    tracker.started(0, 5)
    tracker.started(1, 100)
    tracker.started(1, 101)

    assert tracker.finished(1, 100) == 101
    assert tracker.finished(0, 5) == 6
    assert tracker.finished(1, 101) == 102


def test_finishing_an_offset_twice_reports_no_move_the_second_time():
    tracker = tracker_with(0, [0, 1])

    assert tracker.finished(0, 0) == 1
    assert tracker.finished(0, 0) is None
    assert tracker.in_flight() == 1


def test_finishing_an_offset_never_started_changes_nothing():
    tracker = tracker_with(0, [3])

    assert tracker.finished(0, 2) is None
    assert tracker.finished(0, 4) is None
    assert tracker.finished(1, 3) is None
    assert tracker.in_flight() == 1
    assert tracker.finished(0, 3) == 4


def test_a_duplicate_start_is_finished_by_one_finish():
    tracker = tracker_with(0, [0, 1, 1])

    assert tracker.in_flight() == 2
    assert tracker.finished(0, 1) is None
    assert tracker.finished(0, 0) == 2
    assert tracker.in_flight() == 0


def test_a_redelivered_offset_holds_the_commit_back_again():
    tracker = tracker_with(0, [0, 1])
    tracker.finished(0, 1)

    tracker.started(0, 1)

    assert tracker.finished(0, 0) == 1
    assert tracker.finished(0, 1) == 2


def test_finishing_work_of_a_forgotten_partition_reports_nothing():
    tracker = tracker_with(0, [0, 1])
    tracker.started(1, 0)

    tracker.forget([0])

    assert tracker.finished(0, 0) is None
    assert tracker.finished(0, 1) is None
    assert tracker.in_flight() == 1
    assert tracker.finished(1, 0) == 1


def test_a_partition_assigned_again_starts_from_its_new_offsets():
    tracker = tracker_with(0, [50, 51])
    tracker.finished(0, 50)
    tracker.forget([0])

    tracker.started(0, 40)

    assert tracker.finished(0, 40) == 41


def test_forgetting_an_unknown_partition_is_harmless():
    tracker = tracker_with(0, [0])

    tracker.forget([3, 4])

    assert tracker.in_flight() == 1
    assert tracker.finished(0, 0) == 1


def test_in_flight_counts_unfinished_offsets_of_all_partitions():
    tracker = OffsetTracker()
    assert tracker.in_flight() == 0

    tracker.started(0, 0)
    tracker.started(0, 1)
    tracker.started(2, 9)
    assert tracker.in_flight() == 3

    tracker.finished(0, 1)
    assert tracker.in_flight() == 2

    tracker.forget([2])
    assert tracker.in_flight() == 1


@given(
    first=st.integers(min_value=0, max_value=10_000),
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40),
    data=st.data(),
)
def test_committed_offset_is_always_the_lowest_unfinished_offset(first, gaps, data):
    offsets = [first]
    for gap in gaps:
        offsets.append(offsets[-1] + gap)
    tracker = OffsetTracker()
    unstarted = list(offsets)
    unfinished: list[int] = []
    committable = None
    while unstarted or unfinished:
        if unstarted and (not unfinished or data.draw(st.booleans())):
            offset = unstarted.pop(0)
            tracker.started(0, offset)
            unfinished.append(offset)
            committable = min(unfinished)
            continue
        offset = data.draw(st.sampled_from(unfinished))
        unfinished.remove(offset)
        newest = offsets[len(offsets) - len(unstarted) - 1]
        expected = min(unfinished) if unfinished else newest + 1

        moved = tracker.finished(0, offset)

        assert moved == (expected if expected != committable else None)
        assert tracker.in_flight() == len(unfinished)
        committable = expected
    assert committable == offsets[-1] + 1
