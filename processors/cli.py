"""`imagegen processor`: run the intake processor."""

from __future__ import annotations

from typing import Annotated

import typer

from infra.settings import load_settings


def processor(
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Validate, dedupe and rate-limit requests into imagegen.render, until SIGTERM."""
    from processors.app import IntakeProcessor  # faust is slow to import; only load it here

    IntakeProcessor(load_settings()).run(log_level)
