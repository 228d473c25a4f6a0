"""Every user's webhook secret on `imagegen.webhook-secrets`, in memory, kept current by a
thread: what a deliverer signs with, and how it learns of a rotation.

`start` returns once the book holds every secret the topic held, and a secret made or
rotated later reaches the book within about one fetch wait (`IMAGEGEN_KAFKA_FETCH_WAIT_MS`;
the reading is `infra.compacted_book`'s). A record whose Kafka key is not its user_id is
skipped: keyed otherwise, compaction would keep it beside the user's later records, and a
record written under one user's key could set another user's secret.
"""

from __future__ import annotations

import logging

from imagegen.infra.compacted_book import CompactedBook
from imagegen.infra.settings import Settings
from imagegen.schemas.topics import WEBHOOK_SECRETS
from imagegen.schemas.webhook_secrets import WebhookSecretRecord

log = logging.getLogger(__name__)


class WebhookSecretBook(CompactedBook[WebhookSecretRecord]):
    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings,
            WEBHOOK_SECRETS,
            WebhookSecretRecord,
            "imagegen-webhook-secret-book",
            "the webhook secret book",
        )
        self._records: dict[str, WebhookSecretRecord] = {}

    def record_of(self, user_id: str) -> WebhookSecretRecord | None:
        """The latest secret record of `user_id`; None for a user who has none yet."""
        with self._lock:
            return self._records.get(user_id)

    def _keep(self, key: str, record: WebhookSecretRecord) -> None:
        if key != record.user_id:
            # Named by user and Kafka key only: the record holds a secret.
            log.warning(
                "skipping a webhook secret record of user %r on %s: its Kafka key is %r, "
                "not its user_id",
                record.user_id,
                WEBHOOK_SECRETS,
                key,
            )
            return
        self._records[key] = record

    def _forget(self, key: str) -> None:
        self._records.pop(key, None)
