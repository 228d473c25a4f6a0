"""Make and revoke API keys of the HTTP gateway: records on the compacted `imagegen.api-keys`.

`KeyRegistry.create` mints a token (`schemas.api_keys`), publishes its hash and returns the
token: the only time anyone sees it, and nothing here logs it. `revoke` publishes the key's
record again with `revoked_at`; compaction then keeps only that one, and every gateway's key
book refuses the key within about one fetch wait. Both return once the broker acknowledged
the record (acks=all), raising `BrokerUnavailable` or `PublishError` otherwise.

Only operators may write the topic (see the README's trust model): whoever can write it can
make keys for any user.
"""

from __future__ import annotations

import logging

from confluent_kafka import Producer

from imagegen.infra.kafka import make_producer
from imagegen.infra.key_book import KeyBook
from imagegen.infra.settings import Settings
from imagegen.producers.operator_records import publish_and_wait
from imagegen.schemas.api_keys import ApiKeyRecord, hash_key, key_id_of, mint_key
from imagegen.schemas.errors import ImagegenError
from imagegen.schemas.topics import API_KEYS

DEFAULT_DELIVERY_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


class UnknownKey(ImagegenError, LookupError):
    """No API key has this key_id."""


class KeyRegistry:
    def __init__(
        self, settings: Settings, delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S
    ) -> None:
        self._settings = settings
        self._delivery_timeout_s = delivery_timeout_s
        self._producer: Producer = make_producer(
            settings, **{"message.timeout.ms": int(delivery_timeout_s * 1000)}
        )

    def create(self, user_id: str, name: str | None = None) -> tuple[str, ApiKeyRecord]:
        """A new live key of `user_id`: the token (shown once: only its hash is kept) and
        its record. `InvalidMessage` names a bad user id or name."""
        token = mint_key()
        record = ApiKeyRecord.new(
            key_id=key_id_of(token), user_id=user_id, name=name, key_sha256=hash_key(token)
        )
        self._publish(record)
        log.info("created API key %s of user %r", record.key_id, record.user_id)
        return token, record

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Revoke `key_id` and return its revoked record; one revoked already is returned as
        it is. `UnknownKey` when there is no such key."""
        with KeyBook(self._settings) as book:
            known = {record.key_id: record for record in book.records()}
        record = known.get(key_id)
        if record is None:
            raise UnknownKey(
                f"there is no API key {key_id!r} on {API_KEYS}: `imagegen keys list` shows "
                "the key ids"
            )
        if not record.live:
            return record
        revoked = record.revoked()
        self._publish(revoked)
        log.info("revoked API key %s of user %r", revoked.key_id, revoked.user_id)
        return revoked

    def _publish(self, record: ApiKeyRecord) -> None:
        publish_and_wait(
            self._producer,
            API_KEYS,
            record.kafka_key,
            record,
            "the API key record",
            self._settings.kafka_bootstrap,
            self._delivery_timeout_s,
        )
