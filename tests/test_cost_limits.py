"""Rate limits by cost: a request costs ceil(width * height * steps / (512 * 512 * 25))
tokens, at least 1, from the user's bucket and the partition's share of the global one. One
that costs more than the user's burst is rejected `exceeds_burst`. tests/test_processor.py
runs the same against the real broker."""

from __future__ import annotations

import pytest

from imagegen.processors.intake import Admit, Answer
from imagegen.processors.ratelimit import request_cost
from imagegen.schemas import Reason, Status, encode
from tests.test_intake import Clock, decide, make_intake, request


@pytest.mark.parametrize(
    ("width", "height", "steps", "tokens"),
    [
        (512, 512, 25, 1),
        (64, 64, 1, 1),  # at least one
        (512, 512, 26, 2),  # rounded up
        (1024, 1024, 25, 4),
        (512, 512, 100, 4),
        (2048, 2048, 100, 64),
    ],
)
def test_cost_is_pixels_times_steps_in_512x512x25_units(width, height, steps, tokens) -> None:
    assert request_cost(width, height, steps) == tokens


def big(**fields: object) -> bytes:
    return encode(request(width=1024, height=1024, **fields))  # 4 tokens


def test_the_users_bucket_pays_each_requests_cost() -> None:
    intake = make_intake(Clock(), rate_user_burst=10.0, rate_user_per_s=1.0)
    outcomes = [decide(intake, big(), 0, offset) for offset in range(3)]
    assert [type(o) for o in outcomes] == [Admit, Admit, Answer]
    rejected = outcomes[-1].result
    assert (rejected.status, rejected.reason) == (Status.REJECTED, Reason.RATE_LIMITED)
    assert rejected.retry_after_ms == 2000  # 2 tokens held, 4 needed, at 1/s
    assert "costs 4 token" in rejected.detail
    # The cheap request still fits in what is left.
    assert isinstance(decide(intake, encode(request()), 0, 3), Admit)


def test_a_request_dearer_than_the_burst_is_rejected_naming_the_largest_allowed() -> None:
    intake = make_intake(Clock(), rate_user_burst=10.0, rate_user_per_s=1.0)
    outcome = decide(intake, encode(request(width=2048, height=2048, steps=100)), 0, 0)
    assert isinstance(outcome, Answer)
    result = outcome.result
    assert (result.status, result.reason) == (Status.REJECTED, Reason.EXCEEDS_BURST)
    assert result.retry_after_ms is None  # no wait helps
    assert "costs 64 tokens" in result.detail
    assert "the largest request allowed costs 10 tokens" in result.detail
    assert "at most 65536000" in result.detail
    assert "2048x2048 at 15 steps" in result.detail
    assert request_cost(2048, 2048, 15) <= 10 < request_cost(2048, 2048, 16)
    # It took nothing: the example, costing the whole burst, is admitted next.
    whole_burst = encode(request(width=2048, height=2048, steps=15))
    assert isinstance(decide(intake, whole_burst, 0, 1), Admit)


def test_a_tier_burst_sets_the_largest_request() -> None:
    intake = make_intake(
        Clock(),
        rate_user_burst=2.0,
        rate_user_overrides={"studio": {"per_s": 1.0, "burst": 64.0}},
    )
    huge = {"width": 2048, "height": 2048, "steps": 100}
    assert isinstance(decide(intake, encode(request(user_id="studio", **huge)), 0, 0), Admit)
    outcome = decide(intake, encode(request(user_id="ann", **huge)), 0, 1)
    assert outcome.result.reason is Reason.EXCEEDS_BURST
    assert "costs 2 tokens" in outcome.result.detail


def test_the_global_share_counts_cost() -> None:
    intake = make_intake(Clock(), rate_global_burst=8.0, rate_global_per_s=1.0)
    outcomes = [decide(intake, big(user_id=f"u{i}"), 0, i) for i in range(3)]
    assert [type(o) for o in outcomes] == [Admit, Admit, Answer]
    assert outcomes[-1].result.retry_after_ms == 4000


def test_a_request_dearer_than_a_partitions_global_share_takes_the_whole_share() -> None:
    # 8 tokens over 4 partitions: each share holds 2 and refills at 0.5/s.
    clock = Clock()
    intake = make_intake(clock, partitions=4, rate_global_burst=8.0, rate_global_per_s=2.0)
    assert isinstance(decide(intake, big(user_id="a"), 0, 0), Admit)
    outcome = decide(intake, big(user_id="b"), 0, 1)
    assert outcome.result.reason is Reason.RATE_LIMITED
    assert outcome.result.retry_after_ms == 4000  # the whole share again, at 0.5/s
    clock.now += 4
    assert isinstance(decide(intake, big(user_id="b"), 0, 2), Admit)
