"""One webhook deliverer process: `imagegen webhooks` (`python -m imagegen.webhooks.service`).

It needs the broker (events, retries, secrets) and the object store (image URLs, and dead
letters too big for the DLQ); it stops on SIGTERM or SIGINT, finishing the attempts in
flight (each bounded by the connect and read timeouts) and committing.
"""

from __future__ import annotations

import logging
import signal

from imagegen.gateway.job_store import JobStore
from imagegen.infra.health import Health, probe_broker_and_store
from imagegen.infra.kafka import check_broker
from imagegen.infra.logs import configure_logging
from imagegen.infra.metrics import serve
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.infra.webhook_secret_book import WebhookSecretBook
from imagegen.schemas.topics import WEBHOOK_GROUP
from imagegen.webhooks.attempts import Attempts
from imagegen.webhooks.deliverer import WebhookDeliverer
from imagegen.webhooks.sender import WebhookSender

log = logging.getLogger(__name__)


def run(settings: Settings, metrics_setting: str = "IMAGEGEN_WEBHOOKS_METRICS_PORT") -> None:
    check_broker(settings)
    store = ObjectStore(settings)
    store.check()
    health = Health()
    health.readiness.joining(WEBHOOK_GROUP)
    probe_broker_and_store(health.readiness, settings)
    metrics = serve(
        settings.webhooks_metrics_port,
        settings.metrics_host,
        setting=metrics_setting,
        health=health,
    )
    sender = WebhookSender(settings)
    try:
        with WebhookSecretBook(settings) as secrets:
            attempts = Attempts(settings, secrets, JobStore(store), sender)
            deliverer = WebhookDeliverer(settings, attempts, store, health)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: deliverer.stop())
            if settings.webhook_allow_private:
                log.warning(
                    "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE is on: webhooks may reach private and "
                    "loopback addresses, and plain http. Never in production"
                )
            log.info("delivering webhooks")
            deliverer.run()
    finally:
        sender.close()
        if metrics is not None:
            metrics.shutdown()


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    run(settings)


if __name__ == "__main__":
    main()
