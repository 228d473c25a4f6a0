"""Webhook secrets: the record and its rotation, the secret book and the registry against the
real broker, and `imagegen keys webhook-secret` (and `keys create`, which makes one)."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from typer.testing import CliRunner, Result

from imagegen.cli.keys import keys_app
from imagegen.infra.kafka import make_producer
from imagegen.infra.settings import Settings, as_environment
from imagegen.infra.webhook_secret_book import WebhookSecretBook
from imagegen.producers.webhook_secrets import WebhookSecretRegistry
from imagegen.schemas import WebhookSecretRecord, decode, encode, mint_secret
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import WEBHOOK_SECRETS
from imagegen.schemas.webhook_secrets import ROTATION_GRACE
from imagegen.webhooks import signed_headers, verify
from tests.test_api_keys import eventually, user

SECRET = re.compile(r"whsec_([A-Za-z0-9+/]{43}=)")


# ---- the record ---------------------------------------------------------------------------


def test_a_minted_secret_is_whsec_and_the_base64_of_32_random_bytes() -> None:
    secrets = {mint_secret() for _ in range(200)}
    assert len(secrets) == 200
    for secret in secrets:
        match = SECRET.fullmatch(secret)
        assert match is not None, secret
        assert len(base64.b64decode(match.group(1), validate=True)) == 32


def test_a_record_round_trips_and_is_keyed_by_its_user() -> None:
    record = WebhookSecretRecord.new(user_id="alice")
    assert SECRET.fullmatch(record.secret) and record.previous_secret is None
    assert record.kafka_key == b"alice"
    assert decode(WebhookSecretRecord, encode(record)) == record
    assert record.signing_secrets() == [record.secret]


def test_rotation_keeps_the_previous_secret_signing_for_a_day() -> None:
    record = WebhookSecretRecord.new(user_id="alice")
    now = utc_now()
    rotated = record.rotated(now)
    assert rotated.user_id == "alice" and rotated.secret != record.secret
    assert rotated.previous_secret == record.secret and rotated.created_at == now
    assert rotated.previous_expires_at == now + ROTATION_GRACE == now + timedelta(hours=24)
    assert decode(WebhookSecretRecord, encode(rotated)) == rotated
    assert rotated.signing_secrets(now) == [rotated.secret, record.secret]
    assert rotated.signing_secrets(now + timedelta(hours=23, minutes=59)) == [
        rotated.secret,
        record.secret,
    ]
    assert rotated.signing_secrets(now + ROTATION_GRACE) == [rotated.secret]
    # Rotating again within the grace drops the oldest: only the two latest sign.
    again = rotated.rotated(now + timedelta(hours=1))
    assert again.signing_secrets(now + timedelta(hours=1)) == [again.secret, rotated.secret]


def test_deliveries_during_the_grace_verify_with_either_secret() -> None:
    rotated = WebhookSecretRecord.new(user_id="alice").rotated()
    body = b'{"status": "succeeded"}'
    headers = signed_headers(rotated.signing_secrets(), "msg_" + "a" * 32, body)
    assert rotated.previous_secret is not None
    for secret in (rotated.secret, rotated.previous_secret):
        assert verify(body, headers, secret) == {"status": "succeeded"}


def test_a_record_shows_no_secret_when_printed() -> None:
    rotated = WebhookSecretRecord.new(user_id="alice").rotated()
    assert rotated.previous_secret is not None
    for text in (repr(rotated), str(rotated)):
        assert rotated.secret not in text and rotated.previous_secret not in text
        assert "alice" in text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("secret", "whsec_short"),
        ("secret", "whsec_" + "A" * 44),
        ("secret", mint_secret().replace("whsec_", "wh_")),
        ("secret", mint_secret() + "\n"),
        ("previous_secret", "not a secret"),
        ("user_id", "al ice"),
    ],
)
def test_bad_fields_of_a_record_are_named_and_not_echoed(field: str, value: str) -> None:
    fields = {"user_id": "alice", "previous_expires_at": utc_now(), field: value}
    if field != "previous_secret":
        fields["previous_secret"] = mint_secret()
    with pytest.raises(InvalidMessage) as caught:
        WebhookSecretRecord.new(**fields)
    assert field in dict(caught.value.problems)
    if "secret" in field:
        assert value not in str(caught.value)


def test_a_previous_secret_comes_with_its_expiry() -> None:
    with pytest.raises(InvalidMessage, match="previous_secret and previous_expires_at go"):
        WebhookSecretRecord.new(user_id="alice", previous_secret=mint_secret())
    with pytest.raises(InvalidMessage, match="previous_secret and previous_expires_at go"):
        WebhookSecretRecord.new(user_id="alice", previous_expires_at=utc_now())


# ---- the book and the registry --------------------------------------------------------------


@pytest.fixture(scope="module")
def book(settings: Settings) -> Iterator[WebhookSecretBook]:
    """A book started before the test's secrets exist: they reach it while it runs."""
    with WebhookSecretBook(settings) as started:
        yield started


@pytest.fixture(scope="module")
def registry(settings: Settings) -> WebhookSecretRegistry:
    return WebhookSecretRegistry(settings)


def test_current_makes_a_secret_once_and_returns_it_after(
    settings: Settings, book: WebhookSecretBook, registry: WebhookSecretRegistry
) -> None:
    alice = user()
    assert book.record_of(alice) is None
    first = registry.current(alice, book)
    assert first.user_id == alice and first.previous_secret is None
    # At once, before the running book has read it back, and after.
    assert registry.current(alice, book) == first
    assert eventually(lambda: book.record_of(alice) == first)
    assert registry.current(alice, book) == first
    # Another process: a fresh registry and a fresh book find it on the topic.
    with WebhookSecretBook(settings) as fresh:
        assert fresh.caught_up() and fresh.record_of(alice) == first
        assert WebhookSecretRegistry(settings).current(alice, fresh) == first
    assert not fresh.caught_up()


def test_rotate_keeps_the_previous_secret(
    settings: Settings, book: WebhookSecretBook, registry: WebhookSecretRegistry
) -> None:
    bob = user()
    first = registry.current(bob, book)
    # Another registry rotates, as an operator's CLI does, with a book that holds `first`.
    assert eventually(lambda: book.record_of(bob) == first)
    rotated = WebhookSecretRegistry(settings).rotate(bob, book)
    assert rotated.secret != first.secret and rotated.previous_secret == first.secret
    assert rotated.signing_secrets() == [rotated.secret, first.secret]
    assert eventually(lambda: book.record_of(bob) == rotated)
    # The registry that made the first one now returns the rotated one: the book's is newer.
    assert registry.current(bob, book) == rotated
    with WebhookSecretBook(settings) as fresh:
        assert fresh.record_of(bob) == rotated


def test_rotating_a_user_without_a_secret_makes_one(
    book: WebhookSecretBook, registry: WebhookSecretRegistry
) -> None:
    carol = user()
    made = registry.rotate(carol, book)
    assert made.previous_secret is None and made.signing_secrets() == [made.secret]
    assert registry.current(carol, book) == made


def test_records_that_are_not_a_users_secret_are_skipped(
    settings: Settings,
    book: WebhookSecretBook,
    registry: WebhookSecretRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dave, mallory = user(), user()
    planted = WebhookSecretRecord.new(user_id=dave)
    producer = make_producer(settings)
    producer.produce(WEBHOOK_SECRETS, key=b"junk", value=b"\xff not json")
    producer.produce(WEBHOOK_SECRETS, key=dave.encode(), value=b'{"user_id": "x"}')
    # Dave's record under Mallory's key must not set anyone's secret.
    producer.produce(WEBHOOK_SECRETS, key=mallory.encode(), value=encode(planted))
    assert producer.flush(30) == 0
    with caplog.at_level(logging.WARNING, logger="imagegen.infra"):
        real = registry.current(mallory, book)
        assert eventually(lambda: book.record_of(mallory) == real)
        with WebhookSecretBook(settings) as fresh:
            assert fresh.record_of(mallory) == real
            assert fresh.record_of(dave) is None
    assert book.caught_up() and book.record_of(dave) is None
    assert "skipping" in caplog.text and "not its user_id" in caplog.text
    assert planted.secret.removeprefix("whsec_") not in caplog.text


def test_a_tombstone_makes_a_book_forget_the_secret(
    settings: Settings, book: WebhookSecretBook
) -> None:
    erin = user()
    record = WebhookSecretRegistry(settings).current(erin, book)
    assert eventually(lambda: book.record_of(erin) == record)
    producer = make_producer(settings)
    producer.produce(WEBHOOK_SECRETS, key=record.kafka_key, value=None)
    assert producer.flush(30) == 0
    assert eventually(lambda: book.record_of(erin) is None)


def test_making_and_rotating_secrets_never_logs_them(
    book: WebhookSecretBook, registry: WebhookSecretRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    frank = user()
    with caplog.at_level(logging.DEBUG):
        made = registry.current(frank, book)
        rotated = registry.rotate(frank, book)
    assert frank in caplog.text  # it does log, by user
    for secret in (made.secret, rotated.secret):
        for logged in caplog.records:
            assert secret[6:] not in logged.getMessage()
            assert secret[6:] not in str(logged.__dict__)


def test_a_bad_user_id_is_refused_before_anything_is_published(
    book: WebhookSecretBook, registry: WebhookSecretRegistry
) -> None:
    with pytest.raises(InvalidMessage, match="user_id"):
        registry.current("not a user id", book)


# ---- imagegen keys ------------------------------------------------------------------------


def keys(stack: Settings, *args: str) -> Result:
    """`imagegen keys <args>` pointed at `stack`, in this process."""
    return CliRunner().invoke(keys_app, list(args), env=as_environment(stack))


def test_webhook_secret_prints_the_secret_alone_and_the_same_each_time(
    settings: Settings,
) -> None:
    grace = user()
    first = keys(settings, "webhook-secret", "--user", grace)
    assert first.exit_code == 0, first.output
    secret = first.stdout.strip()
    assert first.stdout == secret + "\n" and SECRET.fullmatch(secret)
    assert secret not in first.stderr
    assert "--rotate" in first.stderr and "24 hours" in first.stderr
    assert "webhook-signature" in first.stderr
    again = keys(settings, "webhook-secret", "--user", grace)
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    with WebhookSecretBook(settings) as fresh:
        record = fresh.record_of(grace)
    assert record is not None and record.secret == secret


def test_webhook_secret_rotate_prints_a_new_one_and_the_old_keeps_signing(
    settings: Settings,
) -> None:
    heidi = user()
    old = keys(settings, "webhook-secret", "--user", heidi).stdout.strip()
    rotated = keys(settings, "webhook-secret", "--user", heidi, "--rotate")
    assert rotated.exit_code == 0, rotated.output
    new = rotated.stdout.strip()
    assert rotated.stdout == new + "\n" and SECRET.fullmatch(new) and new != old
    assert "previous secret until" in rotated.stderr and old not in rotated.stderr
    with WebhookSecretBook(settings) as fresh:
        record = fresh.record_of(heidi)
    assert record is not None and record.signing_secrets() == [new, old]
    # Without --rotate, the new one from now on.
    assert keys(settings, "webhook-secret", "--user", heidi).stdout.strip() == new


def test_webhook_secret_refuses_a_bad_user_id(settings: Settings) -> None:
    refused = keys(settings, "webhook-secret", "--user", "not a user")
    assert refused.exit_code != 0
    assert "user_id" in str(refused.exception) or "user_id" in refused.output


def test_creating_a_key_makes_sure_the_user_has_a_webhook_secret(settings: Settings) -> None:
    ivan = user()
    created = keys(settings, "create", "--user", ivan)
    assert created.exit_code == 0, created.output
    assert created.stdout.startswith("igk_") and "keys webhook-secret" in created.stderr
    with WebhookSecretBook(settings) as fresh:
        record = fresh.record_of(ivan)
    assert record is not None
    assert record.secret not in created.stdout + created.stderr
    # A second key keeps the secret the first one made.
    assert keys(settings, "create", "--user", ivan).exit_code == 0
    printed = keys(settings, "webhook-secret", "--user", ivan).stdout.strip()
    assert printed == record.secret
