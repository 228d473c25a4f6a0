"""`imagegen gateway`: run the HTTP gateway."""

from __future__ import annotations

from typing import Annotated

import typer

from imagegen.cli.extras import require_extras
from imagegen.cli.options import LogLevel
from imagegen.infra.settings import load_settings


def gateway(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on; default IMAGEGEN_GATEWAY_HOST.")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port to listen on; default IMAGEGEN_GATEWAY_PORT."),
    ] = None,
    log_level: LogLevel = None,
) -> None:
    """Serve the HTTP API (submit, follow, cancel, fetch images) until SIGTERM."""
    require_extras("gateway", "gateway")
    from imagegen.gateway.server import serve  # fastapi and uvicorn: only load them here

    overrides = {
        name: value
        for name, value in (("gateway_host", host), ("gateway_port", port))
        if value is not None
    }
    serve(load_settings(**overrides), log_level)
