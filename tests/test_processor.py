"""The intake processor as a real process against a real broker: dedupe, rate limits,
bad input, SIGKILL mid-stream, hostile keys and headers, and a send that fails."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.replay_marks import sign
from imagegen.infra.settings import Settings, load_settings
from imagegen.processors.dedupe import dedupe_key
from imagegen.producers import RequestPublisher
from imagegen.schemas import (
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    Reason,
    Stage,
    Status,
    decode,
    encode,
)
from imagegen.schemas.headers import ADMITTED_AT_HEADER, REPLAY_HEADER
from imagegen.schemas.topics import DLQ, RENDER, REQUESTS, RESULTS
from tests.conftest import settings_env
from tests.helpers import read_topic, results_for
from tests.processes import Service


def start_processor(stack: Settings, tmp_path: Path, **env: str) -> Service:
    variables = {f"IMAGEGEN_{name.upper()}": value for name, value in env.items()}
    processor = Service(
        ["processor"], {**settings_env(stack), **variables}, tmp_path / "processor.log"
    )
    processor.start()
    return processor


@pytest.fixture
def processor_factory(isolated_stack: Settings, tmp_path: Path) -> Iterator:
    started: list[Service] = []

    def start(**env: str) -> Service:
        processor = start_processor(isolated_stack, tmp_path, **env)
        started.append(processor)
        return processor

    yield start
    for processor in started:
        processor.stop()


def rendered_ids(stack: Settings, expected: set[str], timeout_s: float = 60) -> list[str]:
    """Request ids on imagegen.render, read until every id in `expected` is there."""
    ids: list[str] = []

    def seen_all(messages: list) -> bool:
        ids.extend(decode(GenerationRequest, m.value()).request_id for m in messages[len(ids) :])
        return expected <= set(ids)

    read_topic(stack, RENDER, seen_all, timeout_s)
    return ids


def admitted_apart(
    stack: Settings, first: GenerationRequest, later: GenerationRequest, apart_s: float
) -> None:
    """Publish `first` and see it admitted, let `apart_s` pass (the passing of time is what
    the callers test), then publish `later` and see it admitted."""
    with RequestPublisher(stack) as publisher:
        publisher.publish(first)
        rendered_ids(stack, {first.request_id})
        time.sleep(apart_s)
        publisher.publish(later)
    rendered_ids(stack, {later.request_id})


DEDUPE_CHANGELOG = "imagegen-processor-dedupe-changelog"
BUCKETS_CHANGELOG = "imagegen-processor-buckets-changelog"
DEDUPE_AND_LIMITS = {
    "dedupe_window_s": "3",
    "rate_user_per_s": "0.5",
    "rate_user_burst": "3",
    "rate_global_per_s": "1000",
    "rate_global_burst": "1000",
    "rate_user_overrides": json.dumps({"gold": {"per_s": 0.2, "burst": 8}}),
}


def test_dedupe_by_request_id_and_by_idempotency_key(processor_factory, isolated_stack) -> None:
    processor_factory(**DEDUPE_AND_LIMITS)
    first = GenerationRequest.new(user_id="ann", prompt="one", idempotency_key="order-1")
    same_key = GenerationRequest.new(user_id="ann", prompt="two", idempotency_key="order-1")
    sentinel = GenerationRequest.new(user_id="ann", prompt="last")
    with RequestPublisher(isolated_stack) as publisher:
        publisher.publish(first)
        publisher.publish(first)  # a publish retry: same request_id
        publisher.publish(same_key)
        publisher.publish(sentinel)  # same user, same partition: read after the others

    rendered = rendered_ids(isolated_stack, {first.request_id, sentinel.request_id})
    assert rendered.count(first.request_id) == 1
    assert same_key.request_id not in rendered
    results = results_for(isolated_stack, {same_key.request_id})
    (duplicate,) = results[same_key.request_id]
    assert (duplicate.status, duplicate.duplicate_of) == (Status.DUPLICATE, first.request_id)
    assert first.request_id not in results  # the retry was dropped silently


def test_the_dedupe_window_expires(processor_factory, isolated_stack) -> None:
    processor_factory(**DEDUPE_AND_LIMITS)
    first = GenerationRequest.new(user_id="bea", prompt="a", idempotency_key="k")
    later = GenerationRequest.new(user_id="bea", prompt="b", idempotency_key="k")
    # Past the 3 s window the same key is admitted again.
    admitted_apart(isolated_stack, first, later, apart_s=3.1)


def test_expired_dedupe_entries_are_deleted_from_the_changelog(
    processor_factory, isolated_stack
) -> None:
    processor_factory(**DEDUPE_AND_LIMITS)
    first = GenerationRequest.new(user_id="cid", prompt="a", idempotency_key="old")
    later = GenerationRequest.new(user_id="cid", prompt="b", idempotency_key="new")
    # Past the 3 s window, the batch that admits `later` first sweeps the memory.
    admitted_apart(isolated_stack, first, later, apart_s=3.1)
    expired_key, live_key = (json.dumps(dedupe_key(r)).encode() for r in (first, later))

    def swept(messages: list) -> bool:
        # The expired entry gets a tombstone; the one admitted after the sweep stays.
        values = {m.key(): m.value() for m in messages}
        return expired_key in values and values[expired_key] is None and bool(values.get(live_key))

    read_topic(isolated_stack, DEDUPE_CHANGELOG, swept, timeout_s=30)


def test_token_buckets_refilled_to_their_burst_are_deleted_from_the_changelog(
    processor_factory, isolated_stack
) -> None:
    processor_factory(**DEDUPE_AND_LIMITS)
    first = GenerationRequest.new(user_id="dot", prompt="a")
    later = GenerationRequest.new(user_id="eve", prompt="b")
    # Once dot's token is back (0.5/s), the batch that admits `later` first sweeps buckets.
    admitted_apart(isolated_stack, first, later, apart_s=2.1)
    refilled, active = (json.dumps(f"user:{r.user_id}").encode() for r in (first, later))

    def swept(messages: list) -> bool:
        values = {m.key(): m.value() for m in messages}
        return refilled in values and values[refilled] is None and bool(values.get(active))

    read_topic(isolated_stack, BUCKETS_CHANGELOG, swept, timeout_s=30)


def test_user_limits_overrides_and_retry_after(processor_factory, isolated_stack) -> None:
    processor_factory(**DEDUPE_AND_LIMITS)
    plain = [GenerationRequest.new(user_id="cat", prompt=f"p{i}") for i in range(5)]
    gold = [GenerationRequest.new(user_id="gold", prompt=f"g{i}") for i in range(9)]
    with RequestPublisher(isolated_stack) as publisher:
        for request in [*plain, *gold]:
            publisher.publish(request)

    limited = {r.request_id for r in plain[3:]} | {gold[-1].request_id}
    results = results_for(isolated_stack, limited)
    for request_id in limited:
        (result,) = results[request_id]
        assert (result.status, result.reason) == (Status.REJECTED, Reason.RATE_LIMITED)
    # 3-token bucket refilling at 0.5/s: the next token comes within 2 s.
    assert all(0 < results[r.request_id][0].retry_after_ms <= 2000 for r in plain[3:])
    # gold: 8-token bucket refilling at 0.2/s, slow enough that no token comes back while
    # the test publishes.
    assert 0 < results[gold[-1].request_id][0].retry_after_ms <= 5000
    admitted = {r.request_id for r in [*plain[:3], *gold[:8]]}
    assert admitted <= set(rendered_ids(isolated_stack, admitted))


def test_the_global_limit_holds_across_partitions(processor_factory, isolated_stack) -> None:
    # 6 tokens shared out over 6 partitions, refilling at 0.6/s in all.
    processor_factory(
        rate_global_per_s="0.6", rate_global_burst="6", rate_user_per_s="100", rate_user_burst="100"
    )
    requests = [GenerationRequest.new(user_id=f"user-{i}", prompt="x") for i in range(20)]
    with RequestPublisher(isolated_stack) as publisher:
        for request in requests:
            publisher.publish(request)
    # Every request ends admitted or rejected; wait for the rejections to know all were seen.
    ids = {r.request_id for r in requests}

    def all_decided(messages: list) -> bool:
        answered = {decode(GenerationResult, m.value()).request_id for m in messages}
        return len(answered & ids) >= len(ids) - 6

    answers = read_topic(isolated_stack, RESULTS, all_decided, timeout_s=60)
    rejected = [decode(GenerationResult, m.value()) for m in answers]
    rejected = [r for r in rejected if r.request_id in ids]
    admitted = ids - {r.request_id for r in rejected}
    assert 1 <= len(admitted) <= 6
    assert admitted <= set(rendered_ids(isolated_stack, admitted))
    for result in rejected:
        assert result.reason is Reason.RATE_LIMITED
        assert 0 < result.retry_after_ms <= 10_000  # one partition's token at 0.1/s


def malformed_payloads() -> list[bytes]:
    """Requests with one field broken in a way hypothesis chooses."""
    payloads: list[bytes] = []
    broken_values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.text(max_size=30),
        st.lists(st.integers(), max_size=2),
    )

    @hypothesis_settings(max_examples=20, database=None)
    @given(
        field=st.sampled_from(
            [
                "width",
                "steps",
                "prompt",
                "seed",
                "guidance_scale",
                "output_format",
                "schema_version",
                "submitted_at",
            ]
        ),
        value=broken_values,
    )
    def collect(field: str, value: object) -> None:
        fields = json.loads(encode(GenerationRequest.new(user_id="eve", prompt="p")))
        fields[field] = value
        try:
            decode(GenerationRequest, json.dumps(fields).encode())
        except ValueError:
            payloads.append(json.dumps(fields).encode())

    collect()
    return payloads


def test_bad_input_of_every_kind_is_dead_lettered(processor_factory, isolated_stack) -> None:
    processor = processor_factory(**DEDUPE_AND_LIMITS)
    readable = json.loads(encode(GenerationRequest.new(user_id="eve", prompt="p")))
    wrong_version = {**readable, "schema_version": 2}
    oversized = json.loads(encode(GenerationRequest.new(user_id="eve", prompt="p")))
    payloads = [
        b"\xff\xfe\xfd not utf-8",
        b"plain garbage",
        b"[1, 2, 3]",
        None,
        json.dumps({**oversized, "prompt": "x" * 70_000}).encode(),
        json.dumps(wrong_version).encode(),
        *malformed_payloads(),
    ]
    producer = make_producer(isolated_stack)
    for payload in payloads:
        producer.produce(REQUESTS, key=b"eve", value=payload, headers=[("origin", b"test")])
    assert producer.flush(10) == 0
    after = GenerationRequest.new(user_id="eve", prompt="still running")
    with RequestPublisher(isolated_stack) as publisher:
        publisher.publish(after)

    assert after.request_id in rendered_ids(isolated_stack, {after.request_id})
    letters = [
        DeadLetter.from_kafka(m.key(), m.value(), m.headers())
        for m in read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= len(payloads))
    ]
    assert sorted(letter.value or b"" for letter in letters) == sorted(p or b"" for p in payloads)
    for letter in letters:
        assert letter.stage is Stage.VALIDATE
        assert letter.original_topic == REQUESTS
        assert ("origin", b"test") in letter.original_headers
        assert letter.error_class == "imagegen.schemas.errors.InvalidMessage"
    answered = results_for(isolated_stack, {wrong_version["request_id"]})
    rejection = answered[wrong_version["request_id"]][0]
    assert (rejection.status, rejection.reason) == (Status.REJECTED, Reason.INVALID_REQUEST)
    assert "schema_version" in rejection.detail
    processor.assert_running()


HIGH_LIMITS = {
    "rate_user_per_s": "1000",
    "rate_user_burst": "1000",
    "rate_global_per_s": "100000",
    "rate_global_burst": "100000",
}


def keyed_requests(count: int) -> list[GenerationRequest]:
    return [
        GenerationRequest.new(user_id=f"u{i % 25}", prompt=f"p{i}", idempotency_key=f"k{i}")
        for i in range(count)
    ]


def wait_until_committed(stack: Settings, total: int, timeout_s: float = 60) -> None:
    """Wait until the processor's group has committed `total` records of imagegen.requests."""
    consumer = make_consumer(stack, group_id="imagegen-processor")
    metadata = consumer.list_topics(REQUESTS, timeout=10).topics[REQUESTS]
    partitions = [TopicPartition(REQUESTS, p) for p in metadata.partitions]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            committed = consumer.committed(partitions, timeout=10)
            if sum(max(tp.offset, 0) for tp in committed) >= total:
                return
            time.sleep(0.2)  # the broker offers no notification of a group's commits
    finally:
        consumer.close()
    raise AssertionError(f"the processor did not commit {total} records in {timeout_s}s")


def test_sigkill_mid_stream_loses_nothing(processor_factory, isolated_stack) -> None:
    processor = processor_factory(**HIGH_LIMITS)
    requests = keyed_requests(300)
    with RequestPublisher(isolated_stack) as publisher:
        for request in requests[:150]:
            publisher.publish(request)
        rendered_ids(isolated_stack, {requests[0].request_id})  # processing has begun
        for request in requests[150:]:
            publisher.publish(request)
    processor.kill()
    processor_factory(**HIGH_LIMITS)

    everything = {r.request_id for r in requests}
    rendered = rendered_ids(isolated_stack, everything, timeout_s=120)
    assert everything <= set(rendered)
    for message in read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= len(rendered)):
        assert ADMITTED_AT_HEADER in dict(message.headers())


def test_dedupe_memory_survives_sigkill(processor_factory, isolated_stack) -> None:
    # A committed burst, then SIGKILL: nothing will be reprocessed, so the restarted
    # processor knows these keys only if it rebuilt its tables from the changelogs in full.
    processor = processor_factory(**HIGH_LIMITS)
    requests = keyed_requests(200)
    with RequestPublisher(isolated_stack) as publisher:
        for request in requests:
            publisher.publish(request)
        rendered_ids(isolated_stack, {r.request_id for r in requests})
        wait_until_committed(isolated_stack, len(requests))
        processor.kill()
        processor_factory(**HIGH_LIMITS)

        retries = [
            GenerationRequest.new(
                user_id=r.user_id, prompt="again", idempotency_key=r.idempotency_key
            )
            for r in requests
        ]
        for retry in retries:
            publisher.publish(retry)
    answers = results_for(isolated_stack, {r.request_id for r in retries})
    # Results are at least once: a rebalance after the restart (the killed member's session
    # ending) can decide a retry twice, but every answer must be the same.
    for original, retry in zip(requests, retries, strict=True):
        assert {(a.status, a.duplicate_of) for a in answers[retry.request_id]} == {
            (Status.DUPLICATE, original.request_id)
        }


def produce_raw(stack: Settings, records: list[tuple[bytes | None, bytes, list]]) -> None:
    """Publish (key, value, headers) records to imagegen.requests as any client could."""
    producer = make_producer(stack, **{"message.max.bytes": 2_000_000})
    for key, value, headers in records:
        producer.produce(REQUESTS, key=key, value=value, headers=headers)
    assert producer.flush(10) == 0


def test_a_key_that_is_not_the_user_id_is_rejected_and_dead_lettered(
    processor_factory, isolated_stack
) -> None:
    processor = processor_factory(**DEDUPE_AND_LIMITS)
    posing = GenerationRequest.new(user_id="ann", prompt="keyed as someone else")
    keyless = GenerationRequest.new(user_id="ann", prompt="keyed as no one")
    produce_raw(isolated_stack, [(b"mallory", encode(posing), []), (None, encode(keyless), [])])
    # mallory's own request shares the partition of the record that posed as ann's.
    after = GenerationRequest.new(user_id="mallory", prompt="still running")
    with RequestPublisher(isolated_stack) as publisher:
        publisher.publish(after)

    assert after.request_id in rendered_ids(isolated_stack, {after.request_id})
    answers = results_for(isolated_stack, {posing.request_id, keyless.request_id})
    for request, shown in ((posing, "key b'mallory'"), (keyless, "no key")):
        (answer,) = answers[request.request_id]
        assert (answer.status, answer.reason) == (Status.REJECTED, Reason.INVALID_REQUEST)
        assert shown in answer.detail and "user_id 'ann'" in answer.detail
    letters = [
        DeadLetter.from_kafka(m.key(), m.value(), m.headers())
        for m in read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 2)
    ]
    assert sorted(letter.value for letter in letters) == sorted([encode(posing), encode(keyless)])
    assert {letter.stage for letter in letters} == {Stage.VALIDATE}
    assert posing.request_id not in rendered_ids(isolated_stack, {after.request_id})
    processor.assert_running()


def test_reserved_headers_are_not_forwarded(processor_factory, isolated_stack) -> None:
    processor_factory(**DEDUPE_AND_LIMITS)
    request = GenerationRequest.new(user_id="fay", prompt="p")
    headers = [
        ("origin", b"web"),
        ("imagegen.admitted_at_ms", b"x"),
        ("imagegen.anything", b"1"),
        ("dlq.stage", b"render"),
        ("replay.of", b"imagegen.dlq/0/0"),
        ("Replay.Of", b"imagegen.dlq/0/1"),
    ]
    produce_raw(isolated_stack, [(request.kafka_key, encode(request), headers)])

    (message,) = [
        m
        for m in read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= 1)
        if m.value() == encode(request)
    ]
    forwarded = message.headers()
    assert [name for name, _ in forwarded] == ["origin", ADMITTED_AT_HEADER]
    assert dict(forwarded)[ADMITTED_AT_HEADER].isdigit()  # the processor's own


def test_only_a_signed_replay_mark_admits_again_and_is_not_charged(
    processor_factory, isolated_stack
) -> None:
    processor_factory(
        rate_user_per_s="0.001",
        rate_user_burst="2",
        rate_global_per_s="1000",
        rate_global_burst="1000",
    )
    first, second, third = (GenerationRequest.new(user_id="rae", prompt=p) for p in "abc")
    coordinates = "imagegen.dlq/0/3"
    forged = [
        b"imagegen.dlq/0/3",
        sign(coordinates, load_settings(replay_key="a-publisher-guess")),
    ]
    signed = sign(coordinates, isolated_stack)
    produce_raw(
        isolated_stack,
        [
            (b"rae", encode(first), []),  # a token of 2
            *[(b"rae", encode(first), [(REPLAY_HEADER, mark)]) for mark in forged],  # dropped
            (b"rae", encode(first), [(REPLAY_HEADER, signed)]),  # admitted, free
            (b"rae", encode(second), []),  # the last token
            (b"rae", encode(third), []),  # rate limited
        ],
    )

    answers = results_for(isolated_stack, {third.request_id})
    assert answers[third.request_id][0].reason is Reason.RATE_LIMITED
    rendered = rendered_ids(isolated_stack, {first.request_id, second.request_id})
    # Same partition, in order: had a forged mark been trusted, first would be there 4 times.
    assert rendered.count(first.request_id) == 2


def test_cost_based_limits(processor_factory, isolated_stack) -> None:
    processor_factory(
        rate_user_per_s="0.001",
        rate_user_burst="10",
        rate_global_per_s="1000",
        rate_global_burst="1000",
    )
    huge = GenerationRequest.new(user_id="gus", prompt="h", width=2048, height=2048, steps=100)
    big = [GenerationRequest.new(user_id="gus", prompt=p, width=1024, height=1024) for p in "abc"]
    with RequestPublisher(isolated_stack) as publisher:
        for request in [huge, *big]:
            publisher.publish(request)

    answers = results_for(isolated_stack, {huge.request_id, big[2].request_id})
    (too_big,) = answers[huge.request_id]
    assert (too_big.status, too_big.reason) == (Status.REJECTED, Reason.EXCEEDS_BURST)
    assert "the largest request allowed costs 10 tokens" in too_big.detail
    (limited,) = answers[big[2].request_id]
    assert limited.reason is Reason.RATE_LIMITED  # 4 + 4 of 10 tokens spent
    rendered = rendered_ids(isolated_stack, {big[0].request_id, big[1].request_id})
    assert huge.request_id not in rendered


def test_a_failed_send_answers_publish_error_and_the_retry_is_admitted(
    processor_factory, isolated_stack
) -> None:
    processor = processor_factory(**DEDUPE_AND_LIMITS)
    request = GenerationRequest.new(user_id="hal", prompt="p")
    # Within what the broker takes, but its render copy is over the processor producer's
    # 1,000,000-byte limit: the admission's send fails.
    padding = [("padding", b"x" * 1_000_100)]
    produce_raw(isolated_stack, [(request.kafka_key, encode(request), padding)])

    (answer,) = results_for(isolated_stack, {request.request_id})[request.request_id]
    assert (answer.status, answer.reason) == (Status.FAILED, Reason.PUBLISH_ERROR)
    (letter,) = [
        DeadLetter.from_kafka(m.key(), m.value(), m.headers())
        for m in read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 1)
    ]
    assert letter.stage is Stage.PUBLISH
    # The user publishes the same request again: admitted, not dropped as a retry.
    with RequestPublisher(isolated_stack) as publisher:
        publisher.publish(request)
    assert request.request_id in rendered_ids(isolated_stack, {request.request_id})
    processor.assert_running()
