"""The intake decision (validate, dedupe, rate limit, admit) as logic over plain dicts.

The same logic runs inside the faust processor over its tables; tests/test_processor.py
covers that against the real broker.
"""

from __future__ import annotations

import json

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from imagegen.infra.settings import load_settings
from imagegen.processors.dedupe import Deduper
from imagegen.processors.intake import Admit, Answer, Drop, Intake, Invalid, Outcome
from imagegen.schemas import GenerationRequest, Reason, Status, encode
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.uploads import upload_key


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_intake(clock: Clock, partitions: int = 1, **settings: object) -> Intake:
    defaults = {
        "rate_user_per_s": 100.0,
        "rate_user_burst": 100.0,
        "rate_global_per_s": 1000.0,
        "rate_global_burst": 1000.0,
    }
    return Intake(load_settings(**{**defaults, **settings}), {}, {}, partitions, clock)


def decide(
    intake: Intake, value: bytes | None, partition: int, offset: int, replayed: bool = False
) -> Outcome:
    """Decide a record keyed as publishers key requests: by its user_id, where it has one."""
    try:
        key = json.loads(value or b"")["user_id"].encode()
    except (ValueError, TypeError, KeyError, AttributeError):
        key = None
    return intake.decide(value, partition, offset, key=key, replayed=replayed)


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest.new(**{"user_id": "ann", "prompt": "a boat", **fields})


def test_a_fresh_request_is_admitted() -> None:
    intake = make_intake(Clock())
    original = request()
    outcome = decide(intake, encode(original), partition=0, offset=0)
    assert outcome == Admit(original)


def test_a_publish_retry_is_dropped_silently() -> None:
    intake = make_intake(Clock())
    original = encode(request())
    assert isinstance(decide(intake, original, 0, 0), Admit)
    assert isinstance(decide(intake, original, 0, 1), Drop)


def test_redelivery_of_the_admitting_record_is_admitted_again() -> None:
    intake = make_intake(Clock(), rate_user_burst=1.0, rate_user_per_s=0.001)
    original = encode(request())
    assert isinstance(decide(intake, original, 2, 40), Admit)
    assert isinstance(decide(intake, original, 2, 40), Admit)  # same record: crash replay


def test_a_reused_idempotency_key_answers_duplicate_of_the_admitted_request() -> None:
    intake = make_intake(Clock())
    first, second = request(idempotency_key="order-1"), request(idempotency_key="order-1")
    decide(intake, encode(first), 0, 0)
    outcome = decide(intake, encode(second), 0, 1)
    assert isinstance(outcome, Answer)
    assert outcome.result.status is Status.DUPLICATE
    assert outcome.result.duplicate_of == first.request_id
    assert outcome.result.request_id == second.request_id


def test_idempotency_keys_are_per_user() -> None:
    intake = make_intake(Clock())
    decide(intake, encode(request(idempotency_key="k")), 0, 0)
    outcome = decide(intake, encode(request(user_id="bob", idempotency_key="k")), 0, 1)
    assert isinstance(outcome, Admit)


def test_the_dedupe_window_expires() -> None:
    clock = Clock()
    intake = make_intake(clock, dedupe_window_s=60)
    decide(intake, encode(request(idempotency_key="k")), 0, 0)
    clock.now += 60
    assert isinstance(decide(intake, encode(request(idempotency_key="k")), 0, 1), Admit)


def test_duplicates_spend_no_tokens() -> None:
    intake = make_intake(Clock(), rate_user_burst=1.0, rate_user_per_s=0.001)
    decide(intake, encode(request(idempotency_key="k")), 0, 0)
    for offset in range(1, 5):
        outcome = decide(intake, encode(request(idempotency_key="k")), 0, offset)
        assert outcome.result.status is Status.DUPLICATE


def test_user_limit_rejects_with_a_truthful_retry_after() -> None:
    clock = Clock()
    intake = make_intake(clock, rate_user_per_s=2.0, rate_user_burst=3.0)
    outcomes = [decide(intake, encode(request()), 0, i) for i in range(4)]
    assert [type(o) for o in outcomes] == [Admit, Admit, Admit, Answer]
    rejected = outcomes[-1].result
    assert (rejected.status, rejected.reason) == (Status.REJECTED, Reason.RATE_LIMITED)
    assert rejected.retry_after_ms == 500  # one token at 2/s

    clock.now += 0.499
    assert isinstance(decide(intake, encode(request()), 0, 4), Answer)
    clock.now += 0.001
    assert isinstance(decide(intake, encode(request()), 0, 5), Admit)


def test_users_have_separate_buckets() -> None:
    intake = make_intake(Clock(), rate_user_per_s=1.0, rate_user_burst=1.0)
    assert isinstance(decide(intake, encode(request(user_id="a")), 0, 0), Admit)
    assert isinstance(decide(intake, encode(request(user_id="a")), 0, 1), Answer)
    assert isinstance(decide(intake, encode(request(user_id="b")), 0, 2), Admit)


def test_overrides_give_a_user_their_tier() -> None:
    intake = make_intake(
        Clock(),
        rate_user_per_s=1.0,
        rate_user_burst=1.0,
        rate_user_overrides={"vip": {"per_s": 10.0, "burst": 5.0}},
    )
    vip = [decide(intake, encode(request(user_id="vip")), 0, i) for i in range(6)]
    assert [type(o) for o in vip] == [Admit] * 5 + [Answer]
    assert vip[-1].result.retry_after_ms == 100


def test_the_global_limit_is_shared_across_partitions() -> None:
    clock = Clock()
    intake = make_intake(clock, partitions=4, rate_global_per_s=8.0, rate_global_burst=8.0)
    # Each partition holds 8/4 = 2 tokens and refills at 2/s, whoever the users are.
    on_partition_0 = [decide(intake, encode(request(user_id=f"u{i}")), 0, i) for i in range(3)]
    assert [type(o) for o in on_partition_0] == [Admit, Admit, Answer]
    assert on_partition_0[-1].result.retry_after_ms == 500
    assert isinstance(decide(intake, encode(request(user_id="u9")), 1, 0), Admit)


def test_a_rejected_request_takes_no_tokens_from_the_other_bucket() -> None:
    intake = make_intake(
        Clock(),
        rate_user_per_s=1.0,
        rate_user_burst=1.0,
        rate_global_per_s=2.0,
        rate_global_burst=2.0,
    )
    decide(intake, encode(request(user_id="a")), 0, 0)
    decide(intake, encode(request(user_id="a")), 0, 1)  # user-limited: global keeps its token
    assert isinstance(decide(intake, encode(request(user_id="b")), 0, 2), Admit)


def test_invalid_bytes_are_dead_lettered_without_an_answer() -> None:
    outcome = decide(make_intake(Clock()), b"\xff\xfe garbage", 0, 0)
    assert isinstance(outcome, Invalid) and outcome.result is None


@pytest.mark.parametrize("value", [None, b"[]", b'{"request_id": "nope", "user_id": "u"}'])
def test_unreadable_ids_get_no_answer(value: bytes | None) -> None:
    outcome = decide(make_intake(Clock()), value, 0, 0)
    assert isinstance(outcome, Invalid) and outcome.result is None


def test_invalid_request_with_readable_ids_is_answered_rejected() -> None:
    fields = json.loads(encode(request()))
    fields["steps"] = 1000
    outcome = decide(make_intake(Clock()), json.dumps(fields).encode(), 0, 0)
    assert isinstance(outcome, Invalid)
    assert outcome.result is not None
    assert (outcome.result.status, outcome.result.reason) == (
        Status.REJECTED,
        Reason.INVALID_REQUEST,
    )
    assert outcome.result.request_id == fields["request_id"]
    assert "steps" in outcome.result.detail


def test_a_replay_of_an_admitted_request_is_admitted_again() -> None:
    intake = make_intake(Clock())
    original = encode(request())
    assert isinstance(decide(intake, original, 0, 0), Admit)
    assert isinstance(decide(intake, original, 0, 7), Drop)  # a publish retry
    assert isinstance(decide(intake, original, 0, 9, replayed=True), Admit)


def test_only_buckets_refilled_to_their_burst_can_be_forgotten() -> None:
    clock = Clock()
    buckets: dict[str, list] = {}
    settings = load_settings(
        rate_user_per_s=1.0, rate_user_burst=2.0, rate_global_per_s=100.0, rate_global_burst=100.0
    )
    intake = Intake(settings, {}, buckets, partitions=1, clock=clock)
    decide(intake, encode(request(user_id="a")), partition=0, offset=0)
    buckets["user:legacy"] = [0.0, 0.0]  # written before buckets recorded their partition
    assert intake.full_buckets(buckets.items()) == []
    clock.now += 0.999  # user a: 1.999 of 2 tokens; the global share: full again
    assert intake.full_buckets(buckets.items()) == [("global:0", 0)]
    clock.now += 0.5
    assert sorted(intake.full_buckets(buckets.items())) == [("global:0", 0), ("user:a", 0)]


def test_only_entries_past_the_window_expire() -> None:
    deduper = Deduper({}, window_s=10)
    entries = [("old", ["r1", 100.0, 2, 7]), ("fresh", ["r2", 105.0, 4, 9])]
    assert deduper.expired(entries, now=110.0) == [("old", 2)]
    assert deduper.expired(entries, now=109.9) == []


def test_a_failed_admission_answers_publish_error_and_lets_the_retry_in() -> None:
    intake = make_intake(Clock())
    original = request()
    admitted = decide(intake, encode(original), 3, 10)
    answer = intake.unpublished(admitted, 3, 10, MessageSizeTooLargeError("too big"))
    assert answer is not None
    assert (answer.request_id, answer.user_id) == (original.request_id, original.user_id)
    assert (answer.status, answer.reason) == (Status.FAILED, Reason.PUBLISH_ERROR)
    assert "MessageSizeTooLargeError" in answer.detail
    # The user's retry, the same request_id again, is admitted instead of dropped.
    assert isinstance(decide(intake, encode(original), 3, 11), Admit)
    assert isinstance(decide(intake, encode(original), 3, 12), Drop)


def test_a_failed_send_releases_only_the_entry_its_record_made() -> None:
    intake = make_intake(Clock())
    original = request()
    decide(intake, encode(original), 0, 0)
    # A replay admitted elsewhere failed: the entry is the first record's, and stays.
    intake.unpublished(Admit(original), 0, 5, RuntimeError("gone"))
    assert isinstance(decide(intake, encode(original), 0, 6), Drop)


def test_a_failed_answer_is_answered_publish_error() -> None:
    intake = make_intake(Clock())
    first, second = request(idempotency_key="k"), request(idempotency_key="k")
    decide(intake, encode(first), 0, 0)
    duplicate = decide(intake, encode(second), 0, 1)
    answer = intake.unpublished(duplicate, 0, 1, RuntimeError("results refused it"))
    assert answer is not None
    assert (answer.request_id, answer.status, answer.reason, answer.duplicate_of) == (
        second.request_id,
        Status.FAILED,
        Reason.PUBLISH_ERROR,
        None,
    )


@pytest.mark.parametrize("outcome", [Drop("r"), Invalid(InvalidMessage("bad"), None)])
def test_records_without_an_answer_get_none_when_their_sends_fail(outcome: Outcome) -> None:
    assert make_intake(Clock()).unpublished(outcome, 0, 0, RuntimeError("x")) is None


def test_an_edit_of_another_users_upload_is_rejected_naming_the_field() -> None:
    own, bobs = (upload_key(user, "ab" * 32, "png") for user in ("ann", "bob"))
    for fields, named in (
        ({"task": "edit", "image": bobs}, "image must"),
        ({"task": "inpaint", "image": own, "mask": bobs}, "mask must"),
        ({"task": "inpaint", "image": bobs, "mask": bobs}, "image and mask must"),
    ):
        outcome = decide(make_intake(Clock()), encode(request(**fields)), partition=0, offset=0)
        assert isinstance(outcome, Answer)
        assert outcome.result.reason is Reason.INVALID_REQUEST
        assert outcome.result.detail is not None and outcome.result.detail.startswith(named)
        assert "uploads/user=ann/" in outcome.result.detail
    mine = request(task="inpaint", image=own, mask=own, strength=0.5)
    assert isinstance(decide(make_intake(Clock()), encode(mine), partition=0, offset=0), Admit)


def test_a_webhook_url_the_deployment_refuses_is_rejected_and_never_told() -> None:
    plain_http = request(webhook_url="http://hooks.example/imagegen?token=s3cret")
    outcome = decide(make_intake(Clock()), encode(plain_http), partition=0, offset=0)
    assert isinstance(outcome, Answer) and outcome.request is None  # no webhook for it
    assert outcome.result.reason is Reason.INVALID_REQUEST
    assert (
        outcome.result.detail is not None
        and "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE" in outcome.result.detail
    )
    assert "s3cret" not in outcome.result.detail
    allowed = make_intake(Clock(), webhook_allow_private=True)
    assert isinstance(decide(allowed, encode(plain_http), partition=0, offset=0), Admit)
    public = request(webhook_url="https://hooks.example/imagegen")
    assert isinstance(decide(make_intake(Clock()), encode(public), partition=0, offset=0), Admit)
