"""Command-line options that several `imagegen` commands share."""

from __future__ import annotations

from typing import Annotated

import typer

LogLevel = Annotated[
    str | None,
    typer.Option(
        help="debug, info, warning, error or critical; default IMAGEGEN_LOG_LEVEL (info)."
    ),
]


def _metrics_port_help(variable: str, default: int) -> str:
    return (
        f"Port of the Prometheus endpoint, 0 for none; give each process on a host "
        f"its own; default {variable} ({default})."
    )


ProcessorMetricsPort = Annotated[
    int | None,
    typer.Option(
        min=0, max=65535, help=_metrics_port_help("IMAGEGEN_PROCESSOR_METRICS_PORT", 9464)
    ),
]
WorkerMetricsPort = Annotated[
    int | None,
    typer.Option(min=0, max=65535, help=_metrics_port_help("IMAGEGEN_WORKER_METRICS_PORT", 9465)),
]
WebhooksMetricsPort = Annotated[
    int | None,
    typer.Option(min=0, max=65535, help=_metrics_port_help("IMAGEGEN_WEBHOOKS_METRICS_PORT", 9466)),
]
