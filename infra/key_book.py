"""Every API key on `imagegen.api-keys`, in memory, kept current by a thread: how a gateway
knows who sends a request, and learns of a revocation.

`start` returns once the book holds every key the topic held (so a key made before a gateway
started works on its first request), and a key or revocation published later reaches the
book within about one fetch wait (`IMAGEGEN_KAFKA_FETCH_WAIT_MS`; the reading is
`infra.compacted_book`'s). `caught_up` turns false should the thread stop, so a gateway whose
book no longer follows revocations reports itself unready.

The book holds hashes, never tokens: `user_for` hashes the token it is asked about and
compares in constant time. A record whose Kafka key is not its key_id is skipped: keyed
otherwise, compaction would keep it beside the key's later records and no revocation or
tombstone could replace it.
"""

from __future__ import annotations

import hmac
import logging

from imagegen.infra.compacted_book import CompactedBook
from imagegen.infra.settings import Settings
from imagegen.schemas.api_keys import ApiKeyRecord, hash_key, key_id_of
from imagegen.schemas.topics import API_KEYS

log = logging.getLogger(__name__)


class KeyBook(CompactedBook[ApiKeyRecord]):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, API_KEYS, ApiKeyRecord, "imagegen-key-book", "the key book")
        self._keys: dict[str, ApiKeyRecord] = {}

    def user_for(self, token: str) -> str | None:
        """The user of `token` while it is a live key; None for one unknown, revoked or
        malformed."""
        key_id = key_id_of(token)
        if key_id is None:
            return None
        with self._lock:
            record = self._keys.get(key_id)
        if record is None or not record.live:
            return None
        if not hmac.compare_digest(record.key_sha256, hash_key(token)):
            return None
        return record.user_id

    def records(self) -> list[ApiKeyRecord]:
        """The latest record of every key, revoked ones included, oldest first."""
        with self._lock:
            return sorted(self._keys.values(), key=lambda record: record.created_at)

    def _keep(self, key: str, record: ApiKeyRecord) -> None:
        if key != record.key_id:
            log.warning(
                "skipping the record of API key %s on %s: its Kafka key is %r, not its key_id",
                record.key_id,
                API_KEYS,
                key,
            )
            return
        self._keys[key] = record

    def _forget(self, key: str) -> None:
        self._keys.pop(key, None)
