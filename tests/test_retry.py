"""The retry loop: transient errors are tried again, with backoff, up to the policy's limit."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import REGISTRY

from imagegen.consumers.retry import (
    MAX_DELAY_S,
    GaveUp,
    Interrupted,
    RetryPolicy,
    is_transient,
    retrying,
)
from imagegen.schemas.errors import (
    BrokerUnavailable,
    ImagegenError,
    InvalidMessage,
    ObjectStoreError,
    ObjectStoreUnavailable,
)


class Stop:
    """A stop event that records the waits asked of it instead of sleeping."""

    def __init__(self, stop_at_wait=None):
        self.waits = []
        self._stop_at_wait = stop_at_wait

    def wait(self, timeout):
        self.waits.append(timeout)
        return len(self.waits) == self._stop_at_wait


class Flaky:
    """An operation that raises the given errors in turn, then returns its value."""

    def __init__(self, errors, value="done"):
        self._errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self._errors:
            raise self._errors.pop(0)
        return self.value


def retries(stage):
    return REGISTRY.get_sample_value("imagegen_retries_total", {"stage": stage}) or 0.0


def run(operation, stop=None, *, max_attempts=3, base_delay_s=0.5, stage="test"):
    policy = RetryPolicy(max_attempts=max_attempts, base_delay_s=base_delay_s)
    return retrying(policy, "the operation", operation, stop or Stop(), stage=stage)


def test_a_first_success_takes_one_attempt_and_never_waits():
    stop = Stop()
    operation = Flaky([])

    assert run(operation, stop) == ("done", 1)
    assert operation.calls == 1
    assert stop.waits == []


def test_transient_errors_are_retried_until_success():
    operation = Flaky([BrokerUnavailable("down"), ObjectStoreUnavailable("503")])

    assert run(operation, max_attempts=3) == ("done", 3)
    assert operation.calls == 3


def test_gives_up_after_max_attempts_with_the_last_error():
    errors = [BrokerUnavailable("first"), BrokerUnavailable("second"), BrokerUnavailable("third")]
    operation = Flaky([*errors, BrokerUnavailable("never raised")])

    with pytest.raises(GaveUp) as raised:
        run(operation, max_attempts=3)

    assert operation.calls == 3
    assert raised.value.attempts == 3
    assert raised.value.error is errors[2]
    assert raised.value.__cause__ is errors[2]
    assert str(raised.value) == "BrokerUnavailable: third (after 3 attempts)"


def test_one_attempt_allowed_means_no_retry():
    stop = Stop()
    operation = Flaky([BrokerUnavailable("down")])

    with pytest.raises(GaveUp) as raised:
        run(operation, stop, max_attempts=1)

    assert operation.calls == 1
    assert raised.value.attempts == 1
    assert stop.waits == []


@pytest.mark.parametrize(
    "error",
    [
        InvalidMessage("bad"),
        ObjectStoreError("forbidden"),
        ImagegenError("on purpose"),
        ConnectionError("not ours"),
        ValueError("a bug"),
    ],
)
def test_a_permanent_error_gives_up_at_once(error):
    stop = Stop()
    operation = Flaky([error])

    with pytest.raises(GaveUp) as raised:
        run(operation, stop, max_attempts=5)

    assert operation.calls == 1
    assert raised.value.attempts == 1
    assert raised.value.error is error
    assert raised.value.__cause__ is error
    assert stop.waits == []


def test_a_permanent_error_after_transient_ones_stops_the_retries():
    permanent = ObjectStoreError("forbidden")
    operation = Flaky([BrokerUnavailable("down"), permanent])

    with pytest.raises(GaveUp) as raised:
        run(operation, max_attempts=5)

    assert operation.calls == 2
    assert raised.value.attempts == 2
    assert raised.value.error is permanent


def test_a_gave_up_from_an_inner_retry_is_not_retried_again():
    inner = Flaky([GaveUp(BrokerUnavailable("down"), 3)])

    with pytest.raises(GaveUp) as raised:
        run(inner, max_attempts=5)

    assert inner.calls == 1
    assert isinstance(raised.value.error, GaveUp)


def test_base_exceptions_pass_through_unwrapped():
    operation = Flaky([KeyboardInterrupt()])

    with pytest.raises(KeyboardInterrupt):
        run(operation, max_attempts=5)

    assert operation.calls == 1


def test_is_transient_only_for_project_errors_marked_transient():
    assert is_transient(BrokerUnavailable("down"))
    assert is_transient(ObjectStoreUnavailable("503"))
    assert not is_transient(ObjectStoreError("forbidden"))
    assert not is_transient(ImagegenError("on purpose"))
    assert not is_transient(TimeoutError("not ours"))


def test_each_retry_counts_once_in_the_metric_of_its_stage():
    before, other_before = retries("retry-count"), retries("retry-other")
    operation = Flaky([BrokerUnavailable("down")] * 3)

    with pytest.raises(GaveUp):
        run(operation, max_attempts=3, stage="retry-count")

    assert retries("retry-count") - before == 2
    assert retries("retry-other") == other_before


def test_a_first_success_counts_no_retry():
    before = retries("retry-none")

    run(Flaky([]), stage="retry-none")

    assert retries("retry-none") == before


def test_a_permanent_error_counts_no_retry():
    before = retries("retry-permanent")

    with pytest.raises(GaveUp):
        run(Flaky([ValueError("a bug")]), stage="retry-permanent")

    assert retries("retry-permanent") == before


def test_waits_between_attempts_use_the_policy_delays(monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    stop = Stop()
    operation = Flaky([BrokerUnavailable("down")] * 3)

    run(operation, stop, max_attempts=4, base_delay_s=0.5)

    assert stop.waits == [0.5, 1.0, 2.0]


def test_delay_doubles_with_each_attempt_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    policy = RetryPolicy(max_attempts=10, base_delay_s=2.0)

    assert [policy.delay(attempt) for attempt in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert MAX_DELAY_S == 30.0


def test_delay_is_full_jitter_from_zero(monkeypatch):
    bounds = []
    monkeypatch.setattr(random, "uniform", lambda low, high: bounds.append((low, high)) or low)

    assert RetryPolicy(max_attempts=3, base_delay_s=1.0).delay(3) == 0
    assert bounds == [(0, 4.0)]


def test_delay_stays_within_its_bounds():
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0)
    delays = [policy.delay(2) for _ in range(200)]

    assert all(0 <= delay <= 2.0 for delay in delays)
    assert len(set(delays)) > 1


def test_stop_while_waiting_interrupts_with_the_last_error():
    stop = Stop(stop_at_wait=2)
    errors = [BrokerUnavailable("first"), BrokerUnavailable("second")]
    operation = Flaky(errors)

    with pytest.raises(Interrupted) as raised:
        run(operation, stop, max_attempts=5, stage="retry-interrupted")

    assert operation.calls == 2
    assert len(stop.waits) == 2
    assert raised.value.__cause__ is errors[1]
    assert str(raised.value) == "stopped while retrying the operation"
    assert not isinstance(raised.value, GaveUp)


def test_a_set_stop_event_interrupts_before_the_second_attempt():
    stop = threading.Event()
    stop.set()
    operation = Flaky([BrokerUnavailable("down")])

    with pytest.raises(Interrupted):
        run(operation, stop, max_attempts=5, base_delay_s=0.001)

    assert operation.calls == 1


def test_a_set_stop_event_does_not_prevent_the_first_attempt():
    stop = threading.Event()
    stop.set()

    assert run(Flaky([]), stop) == ("done", 1)
