"""Make and rotate users' webhook secrets: records on the compacted `imagegen.webhook-secrets`.

`current` returns a user's secret record, making and publishing one the first time; `rotate`
publishes a fresh secret with the old one kept as the previous for 24 hours
(`schemas.webhook_secrets.ROTATION_GRACE`), so deliveries meanwhile are signed with both.
Both return once the broker acknowledged the record (acks=all), raising `BrokerUnavailable`
or `PublishError` otherwise. Nothing here logs a secret.

Both decide from `book` and what this registry published itself, so the book must hold what
the topic holds (`imagegen keys` starts a fresh one each time): rotating from a book that has
not yet read another process's new secret would drop that secret rather than keep it as the
previous. Two operators making the first secret of one user at the same moment each publish
one; the later record wins on the topic. Only operators may write it (see the README's trust model):
whoever can write it can set any user's secret.
"""

from __future__ import annotations

import logging

from confluent_kafka import Producer

from imagegen.infra.kafka import make_producer
from imagegen.infra.settings import Settings
from imagegen.infra.webhook_secret_book import WebhookSecretBook
from imagegen.producers.operator_records import publish_and_wait
from imagegen.schemas.topics import WEBHOOK_SECRETS
from imagegen.schemas.webhook_secrets import WebhookSecretRecord

DEFAULT_DELIVERY_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


class WebhookSecretRegistry:
    def __init__(
        self, settings: Settings, delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S
    ) -> None:
        self._settings = settings
        self._delivery_timeout_s = delivery_timeout_s
        self._producer: Producer = make_producer(
            settings, **{"message.timeout.ms": int(delivery_timeout_s * 1000)}
        )
        # What this registry published: a running book learns of it only a fetch wait
        # later, and `current` right after must not make a second secret meanwhile.
        self._published: dict[str, WebhookSecretRecord] = {}

    def current(self, user_id: str, book: WebhookSecretBook) -> WebhookSecretRecord:
        """The secret record of `user_id`, made and published if the user has none.
        `InvalidMessage` names a bad user id."""
        record = self._latest(user_id, book)
        if record is not None:
            return record
        record = WebhookSecretRecord.new(user_id=user_id)
        self._publish(record)
        log.info("created the webhook secret of user %r", record.user_id)
        return record

    def rotate(self, user_id: str, book: WebhookSecretBook) -> WebhookSecretRecord:
        """A fresh secret for `user_id`; the current one, if any, keeps signing beside it
        for 24 hours."""
        record = self._latest(user_id, book)
        rotated = WebhookSecretRecord.new(user_id=user_id) if record is None else record.rotated()
        self._publish(rotated)
        log.info(
            "rotated the webhook secret of user %r; the previous one signs until %s",
            rotated.user_id,
            rotated.previous_expires_at,
        )
        return rotated

    def _latest(self, user_id: str, book: WebhookSecretBook) -> WebhookSecretRecord | None:
        known = [r for r in (book.record_of(user_id), self._published.get(user_id)) if r]
        return max(known, key=lambda record: record.created_at, default=None)

    def _publish(self, record: WebhookSecretRecord) -> None:
        publish_and_wait(
            self._producer,
            WEBHOOK_SECRETS,
            record.kafka_key,
            record,
            "the webhook secret record",
            self._settings.kafka_bootstrap,
            self._delivery_timeout_s,
        )
        self._published[record.user_id] = record
