"""`imagegen processor`: run the intake processor."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.settings import load_settings


def processor(
    log_level: Annotated[
        str | None,
        typer.Option(
            help="debug, info, warning, error or critical; default IMAGEGEN_LOG_LEVEL (info)."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Port of the Prometheus endpoint, 0 for none; default "
            "IMAGEGEN_PROCESSOR_METRICS_PORT (9464).",
        ),
    ] = None,
) -> None:
    """Validate, dedupe and rate-limit requests into imagegen.render, until SIGTERM."""
    from processors.app import IntakeProcessor  # faust is slow to import; only load it here

    IntakeProcessor(load_settings()).run(log_level, metrics_port)
