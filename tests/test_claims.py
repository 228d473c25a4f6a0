"""Claims on object keys: one holder per key, the others wait for it and come back in order."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imagegen.consumers.claims import Claims


@dataclass(eq=False)  # jobs are told apart by identity, as the worker's are
class FakeJob:
    key: str


def claims() -> Claims[FakeJob]:
    return Claims(lambda job: job.key)


def test_the_first_job_holds_the_key_and_the_others_wait_in_order() -> None:
    held = claims()
    first, second, third = FakeJob("a"), FakeJob("a"), FakeJob("a")
    assert held.claim(first)
    assert not held.claim(second)
    assert not held.claim(third)
    assert held.release(first) == [second, third]
    # Free again: the waiters, checked again, claim it anew.
    assert held.claim(second)
    assert held.release(second) == []


def test_a_job_that_holds_no_claim_releases_nothing() -> None:
    held = claims()
    holder, waiter, unrelated = FakeJob("a"), FakeJob("a"), FakeJob("b")
    held.claim(holder)
    held.claim(waiter)
    assert held.release(waiter) == []  # it waits; it does not hold
    assert held.release(unrelated) == []  # never claimed (failed before its claim)
    assert held.release(FakeJob("a")) == []  # an equal key, but another job
    assert held.release(holder) == [waiter]


def test_keys_are_claimed_independently() -> None:
    held = claims()
    a, b = FakeJob("a"), FakeJob("b")
    assert held.claim(a)
    assert held.claim(b)
    assert held.release(a) == []
    assert not held.claim(FakeJob("b"))


def test_of_jobs_racing_for_one_key_exactly_one_holds_it() -> None:
    held = claims()
    jobs = [FakeJob("a") for _ in range(16)]
    start = threading.Barrier(len(jobs))

    def claim(job: FakeJob) -> bool:
        start.wait()
        return held.claim(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        won = list(pool.map(claim, jobs))
    assert won.count(True) == 1
    holder = jobs[won.index(True)]
    waiting = held.release(holder)
    assert {id(job) for job in waiting} == {id(job) for job in jobs if job is not holder}
    assert len(waiting) == len(jobs) - 1
