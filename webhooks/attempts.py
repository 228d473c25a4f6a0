"""One attempt at one delivery: build the document, sign it with the user's secret, check
where it goes, POST it. Runs in a thread of the deliverer's pool; never raises for what the
receiver, the network or the user's input did: that is the `Attempted` it returns.

What can never succeed is `permanent` and dead-lettered at once: a URL the SSRF guard
refuses (`infra.webhook_targets`). Everything else (no secret yet, a name that does not
resolve, a timeout, any non-2xx answer) is retried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from imagegen.gateway.job_store import JobStore
from imagegen.infra.settings import Settings
from imagegen.infra.webhook_secret_book import WebhookSecretBook
from imagegen.infra.webhook_targets import (
    WebhookTargetRefused,
    WebhookTargetUnresolvable,
    resolve,
)
from imagegen.schemas import GenerationResult
from imagegen.schemas.fields import utc_now
from imagegen.schemas.webhook_deliveries import WebhookDelivery
from imagegen.webhooks.documents import job_document
from imagegen.webhooks.sender import WebhookSender
from imagegen.webhooks.signatures import signed_headers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempted:
    delivered: bool
    #: Retrying cannot help: dead-letter it now.
    permanent: bool = False
    #: Why it failed: never the URL's path or query, nor a secret.
    error: str | None = None


class Attempts:
    def __init__(
        self, settings: Settings, secrets: WebhookSecretBook, jobs: JobStore, sender: WebhookSender
    ) -> None:
        self._settings = settings
        self._secrets = secrets
        self._jobs = jobs
        self._sender = sender

    def attempt(self, delivery: WebhookDelivery) -> Attempted:
        request = delivery.event.request
        assert request is not None and request.webhook_url is not None
        record = self._secrets.record_of(delivery.user_id)
        if record is None:
            return Attempted(
                False,
                error=f"user {delivery.user_id} has no webhook secret yet: run "
                f"`imagegen keys webhook-secret --user {delivery.user_id}`",
            )
        try:
            # Resolved on every attempt, and connected to by address: a name that pointed
            # somewhere public at submission may point inside the network now.
            target = resolve(request.webhook_url, self._settings.webhook_allow_private)
        except WebhookTargetRefused as refused:
            return Attempted(False, permanent=True, error=str(refused))
        except WebhookTargetUnresolvable as unresolvable:
            return Attempted(False, error=str(unresolvable))
        now = utc_now()
        body = job_document(delivery, self._sign, self._settings.gateway_url_ttl_s, now)
        headers = signed_headers(
            record.signing_secrets(now), delivery.webhook_id, body, time.time()
        )
        sent = self._sender.send(target, body, headers)
        if not sent.delivered:
            log.info(
                "webhook %s of %s not delivered: %s",
                delivery.webhook_id,
                request.request_id,
                sent.error,
                extra={"request_id": request.request_id},
            )
        return Attempted(sent.delivered, permanent=not sent.retryable, error=sent.error)

    def _sign(self, result: GenerationResult) -> str:
        return self._jobs.image_url(result, self._settings.gateway_url_ttl_s)
