"""API keys: the token's form and hash, the key book against the real broker (keys made before
and after it started, revocations, records that are not keys), the registry, and the
`imagegen keys` commands."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from typer.testing import CliRunner, Result

from imagegen.cli.keys import keys_app
from imagegen.infra.kafka import make_producer
from imagegen.infra.key_book import KeyBook
from imagegen.infra.settings import Settings, as_environment
from imagegen.producers.api_keys import KeyRegistry, UnknownKey
from imagegen.schemas import ApiKeyRecord, decode, encode, hash_key, key_id_of, mint_key
from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.topics import API_KEYS

TOKEN = re.compile(r"igk_([a-z0-9]{12})_([A-Za-z0-9_-]{43})")


def user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Whether `check()` holds within `timeout_s`: a record reaches a running book about one
    fetch wait after the broker has it, and nothing tells when."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# ---- the token --------------------------------------------------------------------------


def test_a_minted_key_is_igk_a_key_id_and_32_random_bytes() -> None:
    tokens = {mint_key() for _ in range(200)}
    assert len(tokens) == 200
    key_ids = set()
    for token in tokens:
        match = TOKEN.fullmatch(token)
        assert match is not None, token
        key_ids.add(match.group(1))
        assert key_id_of(token) == match.group(1)
        assert len(base64.urlsafe_b64decode(match.group(2) + "=")) == 32
    assert len(key_ids) == 200


def test_the_hash_is_the_sha256_of_the_whole_token() -> None:
    token = mint_key()
    assert hash_key(token) == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(token))
    assert hash_key(token) != hash_key(token[:-1] + ("A" if token[-1] != "A" else "B"))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "igk_",
        "igk_abcdefghijkl",
        "igk_abcdefghijkl_" + "a" * 42,
        "igk_abcdefghijkl_" + "a" * 44,
        "igk_ABCDEFGHIJKL_" + "a" * 43,
        "igk_abcdefghijk_" + "a" * 43,
        "igx_abcdefghijkl_" + "a" * 43,
        "igk_abcdefghijkl_" + "a" * 42 + "=",
        "igk_abcdefghijkl_" + "a" * 43 + "\n",
        " igk_abcdefghijkl_" + "a" * 43,
        "Bearer igk_abcdefghijkl_" + "a" * 43,
    ],
)
def test_a_malformed_token_has_no_key_id(token: str) -> None:
    assert key_id_of(token) is None


def test_underscores_and_dashes_in_the_secret_are_part_of_it() -> None:
    assert key_id_of("igk_abcdefghijkl_" + "_-" * 21 + "a") == "abcdefghijkl"


def test_a_record_round_trips_and_is_keyed_by_its_key_id() -> None:
    token = mint_key()
    record = ApiKeyRecord.new(
        key_id=key_id_of(token), user_id="alice", name="ci — build 7", key_sha256=hash_key(token)
    )
    assert decode(ApiKeyRecord, encode(record)) == record
    assert record.kafka_key == record.key_id.encode() and record.live
    revoked = record.revoked()
    assert not revoked.live and revoked.revoked_at is not None
    assert revoked.model_dump(exclude={"revoked_at"}) == record.model_dump(exclude={"revoked_at"})
    assert decode(ApiKeyRecord, encode(revoked)) == revoked


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "a\nb"), ("name", "x" * 101), ("name", ""), ("user_id", "al ice"), ("key_id", "X")],
)
def test_bad_fields_of_a_record_are_named(field: str, value: str) -> None:
    token = mint_key()
    fields = {"key_id": key_id_of(token), "user_id": "alice", "key_sha256": hash_key(token)}
    with pytest.raises(InvalidMessage) as caught:
        ApiKeyRecord.new(**{**fields, field: value})
    assert field in dict(caught.value.problems)


# ---- the key book -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def book(settings: Settings) -> Iterator[KeyBook]:
    """A book started before the test's keys exist: they reach it while it runs."""
    with KeyBook(settings) as started:
        yield started


@pytest.fixture(scope="module")
def registry(settings: Settings) -> KeyRegistry:
    return KeyRegistry(settings)


def test_a_key_made_before_a_book_starts_is_known_once_start_returns(
    settings: Settings, registry: KeyRegistry
) -> None:
    alice = user()
    token, record = registry.create(alice, name="laptop")
    assert record.user_id == alice and record.name == "laptop" and record.live
    assert record.key_sha256 == hash_key(token) and record.key_id == key_id_of(token)
    with KeyBook(settings) as fresh:
        assert fresh.caught_up()
        assert fresh.user_for(token) == alice
        assert record in fresh.records()
    assert not fresh.caught_up()


def test_a_key_made_after_a_book_started_reaches_it(book: KeyBook, registry: KeyRegistry) -> None:
    bob = user()
    token, _record = registry.create(bob)
    assert eventually(lambda: book.user_for(token) == bob)


def test_a_revocation_reaches_a_running_book_within_seconds(
    settings: Settings, book: KeyBook, registry: KeyRegistry
) -> None:
    carol = user()
    token, record = registry.create(carol)
    assert eventually(lambda: book.user_for(token) == carol)
    # Revoked by another process's registry, as an operator's CLI does.
    revoked = KeyRegistry(settings).revoke(record.key_id)
    assert revoked.key_id == record.key_id and revoked.revoked_at is not None
    assert eventually(lambda: book.user_for(token) is None)
    assert revoked in book.records()
    # Revoking again changes nothing, and publishes nothing.
    assert registry.revoke(record.key_id) == revoked


def test_unknown_forged_and_malformed_tokens_map_to_no_user(
    book: KeyBook, registry: KeyRegistry
) -> None:
    dave = user()
    token, _record = registry.create(dave)
    assert eventually(lambda: book.user_for(token) == dave)
    key_id = key_id_of(token)
    assert key_id is not None
    forged = f"igk_{key_id}_{mint_key()[-43:]}"  # the right key id, another secret
    for other in ("", "nonsense", token + "x", token[:-1], token.upper(), mint_key(), forged):
        assert book.user_for(other) is None, other


def test_a_revoked_key_is_refused_by_a_book_started_later(
    settings: Settings, registry: KeyRegistry
) -> None:
    token, record = registry.create(user())
    registry.revoke(record.key_id)
    with KeyBook(settings) as fresh:
        assert fresh.user_for(token) is None
        assert next(r for r in fresh.records() if r.key_id == record.key_id).revoked_at


def test_records_that_are_not_keys_are_skipped(
    settings: Settings, book: KeyBook, registry: KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    erin = user()
    stray = mint_key()
    stray_record = ApiKeyRecord.new(
        key_id=key_id_of(stray), user_id=erin, key_sha256=hash_key(stray)
    )
    producer = make_producer(settings)
    producer.produce(API_KEYS, key=b"junk", value=b"\xff not json")
    producer.produce(API_KEYS, key=b"junk2", value=json.dumps({"key_id": "x"}).encode())
    # A key's record under another Kafka key would escape compaction and revocation.
    producer.produce(API_KEYS, key=b"not-its-key-id", value=encode(stray_record))
    assert producer.flush(30) == 0
    token, _record = registry.create(erin)
    with caplog.at_level(logging.WARNING, logger="imagegen.infra"):
        assert eventually(lambda: book.user_for(token) == erin)
        with KeyBook(settings) as fresh:
            assert fresh.user_for(token) == erin
            assert fresh.user_for(stray) is None
    assert book.caught_up() and book.user_for(stray) is None
    skipped = caplog.text
    assert "skipping" in skipped and "not its key_id" in skipped


def test_a_tombstone_makes_a_book_forget_the_key(
    settings: Settings, book: KeyBook, registry: KeyRegistry
) -> None:
    frank = user()
    token, record = registry.create(frank)
    assert eventually(lambda: book.user_for(token) == frank)
    producer = make_producer(settings)
    producer.produce(API_KEYS, key=record.kafka_key, value=None)
    assert producer.flush(30) == 0
    assert eventually(lambda: book.user_for(token) is None)
    assert record.key_id not in {r.key_id for r in book.records()}


def test_revoking_an_unknown_key_is_a_clear_error(registry: KeyRegistry) -> None:
    with pytest.raises(UnknownKey, match=r"no API key 'zzzzzzzzzzzz'.*imagegen keys list"):
        registry.revoke("zzzzzzzzzzzz")


def test_creating_a_key_never_logs_it(
    registry: KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        token, record = registry.create(user(), name="ci")
    secret = token.rsplit("_", 1)[1]
    assert record.key_id in caplog.text  # it does log, by key id
    for logged in caplog.records:
        assert secret not in logged.getMessage()
        assert secret not in str(logged.__dict__)


def test_a_bad_user_id_is_refused_before_anything_is_published(registry: KeyRegistry) -> None:
    with pytest.raises(InvalidMessage, match="user_id"):
        registry.create("not a user id")


# ---- imagegen keys ----------------------------------------------------------------------


def keys(stack: Settings, *args: str) -> Result:
    """`imagegen keys <args>` pointed at `stack`, in this process."""
    return CliRunner().invoke(keys_app, list(args), env=as_environment(stack))


def test_create_prints_the_key_alone_on_stdout(settings: Settings) -> None:
    grace = user()
    created = keys(settings, "create", "--user", grace, "--name", "build box")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert created.stdout == token + "\n"
    assert TOKEN.fullmatch(token)
    assert "shown this once" in created.stderr and token not in created.stderr
    with KeyBook(settings) as fresh:
        assert fresh.user_for(token) == grace


def test_list_shows_keys_but_never_a_key_or_its_hash(
    settings: Settings, registry: KeyRegistry
) -> None:
    heidi = user()
    token, record = registry.create(heidi, name="phone")
    other, _ = registry.create(user())
    for args in (("list", "--user", heidi, "--json"), ("list", "--user", heidi), ("list",)):
        listed = keys(settings, *args)
        assert listed.exit_code == 0, listed.output
        assert record.key_id in listed.stdout
        assert token not in listed.output and record.key_sha256 not in listed.output
        assert other not in listed.output and hash_key(other) not in listed.output
    listed = keys(settings, "list", "--user", heidi, "--json")
    assert [json.loads(line) for line in listed.stdout.splitlines()] == [
        {
            "key_id": record.key_id,
            "user_id": heidi,
            "name": "phone",
            "created_at": record.created_at.isoformat().replace("+00:00", "Z"),
            "revoked_at": None,
        }
    ]


def test_revoke_by_key_id_or_by_the_key_itself(settings: Settings, registry: KeyRegistry) -> None:
    first, one = registry.create(user())
    second, two = registry.create(user())
    by_id = keys(settings, "revoke", one.key_id)
    assert by_id.exit_code == 0, by_id.output
    assert f"API key {one.key_id}" in by_id.stdout and "revoked" in by_id.stdout
    by_token = keys(settings, "revoke", second)
    assert by_token.exit_code == 0, by_token.output
    assert second not in by_token.output
    with KeyBook(settings) as fresh:
        assert fresh.user_for(first) is None and fresh.user_for(second) is None
    listed = keys(settings, "list", "--user", two.user_id, "--json")
    assert json.loads(listed.stdout)["revoked_at"] is not None


def test_revoking_an_unknown_key_exits_non_zero_saying_so(settings: Settings) -> None:
    unknown = keys(settings, "revoke", "zzzzzzzzzzzz")
    assert unknown.exit_code == 1
    assert "no API key 'zzzzzzzzzzzz'" in unknown.stderr and "imagegen keys list" in unknown.stderr
    assert unknown.stdout == ""
    malformed = keys(settings, "revoke", "igk_secret-looking-thing")
    assert malformed.exit_code == 2
    assert "12 lowercase letters or digits" in malformed.output
    assert "secret-looking-thing" not in malformed.output
