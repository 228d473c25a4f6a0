"""`imagegen webhooks`: deliver the jobs' webhooks until SIGTERM."""

from __future__ import annotations

from imagegen.cli.options import LogLevel, WebhooksMetricsPort
from imagegen.infra.logs import configure_logging
from imagegen.infra.settings import load_settings


def webhooks(log_level: LogLevel = None, metrics_port: WebhooksMetricsPort = None) -> None:
    """POST each job's document to its webhook_url on the events it asked for, signed with
    its user's webhook secret; retry failures with backoff for IMAGEGEN_WEBHOOK_RETRY_S, then
    dead-letter them (stage `webhook`) for `imagegen dlq replay`."""
    overrides = {} if metrics_port is None else {"webhooks_metrics_port": metrics_port}
    settings = load_settings(**overrides)
    configure_logging(settings, log_level)
    from imagegen.webhooks.service import run  # the consumer and httpx: only load them here

    run(settings, "--metrics-port (or IMAGEGEN_WEBHOOKS_METRICS_PORT)")
