"""Run one gateway instance: uvicorn serving `gateway.app` until SIGTERM or SIGINT.

uvicorn stops accepting connections on the signal, lets the requests in flight finish
(streams end with the process), then runs the app's shutdown, which stops the publisher
(after flushing), the indexer (leaving its group, so the others take over its partitions
at once), the event hub and the key book; then it ends the process by the same signal, as
uvicorn does (a supervisor sees it stopped by SIGTERM). Its access log is off: `gateway.middleware`
writes the request log, without query strings or credentials.

`python -m imagegen.gateway.server` is `imagegen gateway` with the settings' host and port.
"""

from __future__ import annotations

import uvicorn

from imagegen.gateway.app import create_app
from imagegen.infra.logs import configure_logging
from imagegen.infra.settings import Settings, load_settings

#: How long a shutdown waits for requests in flight (event streams hold on longer).
GRACEFUL_S = 10


def serve(settings: Settings, log_level: str | None = None) -> None:
    """Serve on IMAGEGEN_GATEWAY_HOST:IMAGEGEN_GATEWAY_PORT until a signal stops it."""
    configure_logging(settings, log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        access_log=False,
        log_config=None,  # keep the project's logging (configure_logging) as it is
        timeout_graceful_shutdown=GRACEFUL_S,
        server_header=False,
    )
    uvicorn.Server(config).run()


def main() -> None:
    serve(load_settings())


if __name__ == "__main__":
    main()
