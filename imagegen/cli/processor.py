"""`imagegen processor`: run the intake processor."""

from __future__ import annotations

from imagegen.cli.extras import require_extras
from imagegen.cli.options import LogLevel, ProcessorMetricsPort
from imagegen.infra.settings import load_settings


def processor(log_level: LogLevel = None, metrics_port: ProcessorMetricsPort = None) -> None:
    """Validate, dedupe and rate-limit requests into imagegen.render, until SIGTERM."""
    require_extras("processor", "processor")
    from imagegen.processors.app import (
        IntakeProcessor,  # faust is slow to import; only load it here
    )

    IntakeProcessor(load_settings()).run(log_level, metrics_port)
