"""The retry loop: transient errors are tried again, with backoff, up to the policy's limit
of attempts; outages for as long as its outage budget."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import REGISTRY

from imagegen.consumers.retry import (
    MAX_DELAY_S,
    GaveUp,
    Interrupted,
    Outage,
    RetryPolicy,
    is_outage,
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


class Flake(ImagegenError):
    """A transient error that is no outage (as running out of memory is)."""

    transient = True


class Clock:
    """Monotonic time that passes only when a `Stop` waits."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Stop:
    """A stop event that records the waits asked of it instead of sleeping; they pass on
    `clock`, if it has one."""

    def __init__(self, stop_at_wait=None, clock=None):
        self.waits = []
        self._stop_at_wait = stop_at_wait
        self._clock = clock

    def wait(self, timeout):
        self.waits.append(timeout)
        if self._clock is not None:
            self._clock.now += timeout
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


def run(
    operation,
    stop=None,
    *,
    max_attempts=3,
    base_delay_s=0.5,
    outage_budget_s=0.0,
    outage=None,
    stage="test",
):
    policy = RetryPolicy(max_attempts, base_delay_s, outage_budget_s)
    return retrying(policy, "the operation", operation, stop or Stop(), stage=stage, outage=outage)


def test_a_first_success_takes_one_attempt_and_never_waits():
    stop = Stop()
    operation = Flaky([])

    assert run(operation, stop) == ("done", 1)
    assert operation.calls == 1
    assert stop.waits == []


def test_transient_errors_are_retried_until_success():
    operation = Flaky([Flake("out of memory"), Flake("out of memory")])

    assert run(operation, max_attempts=3) == ("done", 3)
    assert operation.calls == 3


def test_gives_up_after_max_attempts_with_the_last_error():
    errors = [Flake("first"), Flake("second"), Flake("third")]
    operation = Flaky([*errors, Flake("never raised")])

    with pytest.raises(GaveUp) as raised:
        run(operation, max_attempts=3)

    assert operation.calls == 3
    assert raised.value.attempts == 3
    assert raised.value.error is errors[2]
    assert raised.value.__cause__ is errors[2]
    assert str(raised.value) == "Flake: third (after 3 attempts)"


def test_one_attempt_allowed_means_no_retry():
    stop = Stop()
    operation = Flaky([Flake("down")])

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
    operation = Flaky([Flake("down"), permanent])

    with pytest.raises(GaveUp) as raised:
        run(operation, max_attempts=5)

    assert operation.calls == 2
    assert raised.value.attempts == 2
    assert raised.value.error is permanent


def test_a_gave_up_from_an_inner_retry_is_not_retried_again():
    inner = Flaky([GaveUp(Flake("down"), 3)])

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
    assert is_transient(Flake("out of memory"))
    assert not is_transient(ObjectStoreError("forbidden"))
    assert not is_transient(ImagegenError("on purpose"))
    assert not is_transient(TimeoutError("not ours"))


def test_only_unreachable_services_are_outages():
    assert is_outage(BrokerUnavailable("down")) and is_outage(ObjectStoreUnavailable("503"))
    assert not is_outage(Flake("out of memory"))
    assert not is_outage(ObjectStoreError("forbidden"))


def test_each_retry_counts_once_in_the_metric_of_its_stage():
    before, other_before = retries("retry-count"), retries("retry-other")
    operation = Flaky([Flake("down")] * 3)

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
    operation = Flaky([Flake("down")] * 3)

    run(operation, stop, max_attempts=4, base_delay_s=0.5)

    assert stop.waits == [0.5, 1.0, 2.0]


def test_delay_doubles_with_each_attempt_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    policy = RetryPolicy(max_attempts=10, base_delay_s=2.0, outage_budget_s=0)

    assert [policy.delay(attempt) for attempt in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert MAX_DELAY_S == 30.0


def test_delay_is_full_jitter_from_zero(monkeypatch):
    bounds = []
    monkeypatch.setattr(random, "uniform", lambda low, high: bounds.append((low, high)) or low)

    assert RetryPolicy(max_attempts=3, base_delay_s=1.0, outage_budget_s=0).delay(3) == 0
    assert bounds == [(0, 4.0)]


def test_delay_stays_within_its_bounds():
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0, outage_budget_s=0)
    delays = [policy.delay(2) for _ in range(200)]

    assert all(0 <= delay <= 2.0 for delay in delays)
    assert len(set(delays)) > 1


def test_stop_while_waiting_interrupts_with_the_last_error():
    stop = Stop(stop_at_wait=2)
    errors = [Flake("first"), Flake("second")]
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
    operation = Flaky([Flake("down")])

    with pytest.raises(Interrupted):
        run(operation, stop, max_attempts=5, base_delay_s=0.001)

    assert operation.calls == 1


def test_a_set_stop_event_does_not_prevent_the_first_attempt():
    stop = threading.Event()
    stop.set()

    assert run(Flaky([]), stop) == ("done", 1)


def test_an_outage_is_retried_until_its_budget_is_spent_however_many_attempts_it_takes():
    clock = Clock()
    stop = Stop(clock=clock)
    operation = Flaky([ObjectStoreUnavailable("connection refused")] * 1000)

    with pytest.raises(GaveUp) as raised:
        run(operation, stop, max_attempts=1, outage_budget_s=60, outage=Outage(clock))

    assert isinstance(raised.value.error, ObjectStoreUnavailable)
    assert operation.calls == raised.value.attempts > 1
    # The last wait ends at the budget, and the attempt there is the last one.
    assert sum(stop.waits) == pytest.approx(60)
    assert max(stop.waits) <= MAX_DELAY_S


def test_an_outage_that_ends_within_the_budget_loses_nothing():
    clock = Clock()
    operation = Flaky([ObjectStoreUnavailable("connection refused")] * 5)

    assert run(
        operation, Stop(clock=clock), max_attempts=1, outage_budget_s=300, outage=Outage(clock)
    ) == ("done", 6)


def test_a_budget_of_nothing_fails_an_outage_at_once():
    stop = Stop()

    with pytest.raises(GaveUp) as raised:
        run(Flaky([BrokerUnavailable("down")]), stop, max_attempts=5, outage_budget_s=0)

    assert raised.value.attempts == 1
    assert stop.waits == []


def test_outages_do_not_use_up_the_attempts_of_other_transient_errors():
    clock = Clock()
    errors = [ObjectStoreUnavailable("503")] * 3 + [Flake("out of memory")]

    result = run(
        Flaky(errors), Stop(clock=clock), max_attempts=2, outage_budget_s=60, outage=Outage(clock)
    )

    assert result == ("done", 5)


def test_operations_sharing_an_outage_give_up_once_it_has_lasted_the_budget():
    clock = Clock()
    outage = Outage(clock)
    outage.lasted_s()  # another operation met the outage first...
    clock.now += 50  # ...50 s ago, and it has lasted since
    stop = Stop(clock=clock)

    with pytest.raises(GaveUp):
        run(Flaky([ObjectStoreUnavailable("503")] * 1000), stop, outage_budget_s=60, outage=outage)

    assert sum(stop.waits) == pytest.approx(10)


def test_a_success_ends_the_shared_outage():
    clock = Clock()
    outage = Outage(clock)
    stop = Stop(clock=clock)

    run(Flaky([ObjectStoreUnavailable("503")] * 3), stop, outage_budget_s=60, outage=outage)

    assert sum(stop.waits) > 0
    assert outage.lasted_s() == 0  # a new outage starts now
