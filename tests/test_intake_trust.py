"""Trust at intake, as logic: the key must be the user_id, reserved headers are dropped, and
only a replay mark signed with the replay key makes a replay, which the user is not charged
for. tests/test_processor.py covers the same against the real broker."""

from __future__ import annotations

from imagegen.infra.replay_marks import sign
from imagegen.infra.settings import load_settings
from imagegen.processors.intake import Admit, Answer, Invalid
from imagegen.processors.trust import screen
from imagegen.schemas import Reason, Status, encode
from tests.test_intake import Clock, decide, make_intake, request

SETTINGS = load_settings(replay_key="operators-only")
MARK = sign("imagegen.dlq/1/7", SETTINGS)


def test_a_key_that_is_not_the_user_id_is_rejected_and_dead_lettered() -> None:
    ann = request(user_id="ann")
    outcome = make_intake(Clock()).decide(encode(ann), 0, 0, key=b"mallory")
    assert isinstance(outcome, Invalid)
    assert outcome.error.problems == [("key", "must equal user_id")]
    assert outcome.result is not None
    assert (outcome.result.status, outcome.result.reason) == (
        Status.REJECTED,
        Reason.INVALID_REQUEST,
    )
    assert outcome.result.request_id == ann.request_id
    assert "key b'mallory'" in outcome.result.detail
    assert "user_id 'ann'" in outcome.result.detail


def test_a_record_without_a_key_is_rejected_too() -> None:
    outcome = make_intake(Clock()).decide(encode(request()), 0, 0, key=None)
    assert isinstance(outcome, Invalid)
    assert "no key" in outcome.result.detail


def test_a_long_wrong_key_is_quoted_in_part() -> None:
    outcome = make_intake(Clock()).decide(encode(request()), 0, 0, key=b"k" * 100_000)
    assert isinstance(outcome, Invalid)
    assert "first 64 of 100000 bytes" in outcome.result.detail
    assert len(outcome.result.detail) < 1000


def test_a_misrouted_record_spends_nothing_and_is_not_remembered() -> None:
    intake = make_intake(Clock(), rate_user_burst=1.0, rate_user_per_s=0.001)
    ann = encode(request())
    assert isinstance(intake.decide(ann, 0, 0, key=b"bob"), Invalid)
    # The same request keyed right is new (not a publish retry) and finds its token.
    assert isinstance(decide(intake, ann, 1, 0), Admit)


def test_reserved_headers_are_dropped_and_the_rest_kept_in_order() -> None:
    headers = [
        ("origin", b"web"),
        ("imagegen.admitted_at_ms", b"x"),
        ("Imagegen.Admitted_At_Ms", b"1"),
        ("dlq.stage", b"render"),
        ("replay.of", b"imagegen.dlq/0/0"),
        ("REPLAY.other", b""),
        ("traceparent", b"00-aa-bb-01"),
        ("imagegen", b"not a namespace: no dot"),
    ]
    assert screen(headers, SETTINGS).headers == [
        ("origin", b"web"),
        ("traceparent", b"00-aa-bb-01"),
        ("imagegen", b"not a namespace: no dot"),
    ]


def test_only_a_mark_signed_with_the_replay_key_is_a_replay() -> None:
    other_key = load_settings(replay_key="a-publisher-guess")
    coordinates, _, signature = MARK.decode().rpartition(";")
    forged = [
        b"imagegen.dlq/1/7",  # unsigned
        sign("imagegen.dlq/1/7", other_key),  # signed with another key
        f"imagegen.dlq/1/8;{signature}".encode(),  # a signature moved to other coordinates
        b"",
        b"\xff\xfe;\x00",
    ]
    for mark in forged:
        assert screen([("replay.of", mark)], SETTINGS).replay_of is None, mark
    assert screen([("replay.of", MARK)], SETTINGS).replay_of == coordinates
    assert screen([("replay.of", b"junk"), ("replay.of", MARK)], SETTINGS).replay_of == coordinates


def test_without_a_replay_key_no_mark_is_trusted() -> None:
    assert screen([("replay.of", MARK)], load_settings()).replay_of is None


def test_a_replay_is_not_charged_to_the_users_bucket() -> None:
    intake = make_intake(Clock(), rate_user_burst=2.0, rate_user_per_s=0.001)
    first, second, third = (encode(request()) for _ in range(3))
    assert isinstance(decide(intake, first, 0, 0), Admit)  # 1 token left
    assert isinstance(decide(intake, first, 0, 1, replayed=True), Admit)  # free
    assert isinstance(decide(intake, second, 0, 2), Admit)  # the last token
    outcome = decide(intake, third, 0, 3)
    assert isinstance(outcome, Answer) and outcome.result.reason is Reason.RATE_LIMITED


def test_a_replay_is_admitted_even_with_an_empty_bucket() -> None:
    intake = make_intake(Clock(), rate_user_burst=1.0, rate_user_per_s=0.001)
    first, second = encode(request()), encode(request())
    assert isinstance(decide(intake, first, 0, 0), Admit)
    assert isinstance(decide(intake, second, 0, 1), Answer)  # the bucket is empty
    assert isinstance(decide(intake, second, 0, 2, replayed=True), Admit)
