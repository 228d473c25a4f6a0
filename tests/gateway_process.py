"""A real gateway (`python -m imagegen.gateway.server`, uvicorn) as a child process, for tests
and benchmarks.

Interface:

- `GatewayProcess(stack, log, port=None, **env)`: a gateway against `stack`'s broker and
  object store, listening on 127.0.0.1 at `port` (a free one when None), its output
  appended to the file `log`. `env` sets settings by their field name, without the
  IMAGEGEN_ prefix: `gateway_intake_wait_s="2"` is IMAGEGEN_GATEWAY_INTAKE_WAIT_S=2.
- `.start(timeout_s=180) -> Self`: start the process and return once `GET /readyz` answers
  200 (the key book, the event hub and the indexer caught up); raises AssertionError with
  the log's tail if the process exits or stays unready.
- `.url`: "http://127.0.0.1:<port>", the base of every route.
- `.stop() -> int`: SIGTERM and wait for the exit; the exit status.
- `.kill()`: SIGKILL (no shutdown code runs).
- `.restart(timeout_s=180) -> Self`: start it again on the same port (after `stop`/`kill`).
- A context manager: `with GatewayProcess(stack, log) as gateway:` starts, then stops.

`api_key(stack, user_id)` mints a live key for `user_id` through `KeyRegistry` and returns
the bearer token; every gateway's key book sees it within about one fetch wait.

The session timeout matters: each gateway's indexer joins the consumer group
`imagegen-job-index`, and on Tansu a first join takes half the session timeout, so the
stacks of `tests.conftest` (2 s) keep start-up short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Self

from imagegen.cli.children import NotReady, wait_ready
from imagegen.infra.settings import Settings, as_environment
from tests.helpers import free_port

READY_WAIT_S = 180.0


class GatewayProcess:
    def __init__(self, stack: Settings, log: Path, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            **os.environ,
            **as_environment(stack),
            "IMAGEGEN_GATEWAY_HOST": "127.0.0.1",
            "IMAGEGEN_GATEWAY_PORT": str(self.port),
            **{f"IMAGEGEN_{name.upper()}": value for name, value in env.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = READY_WAIT_S) -> Self:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imagegen.gateway.server"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready(timeout_s)
        return self

    def restart(self, timeout_s: float = READY_WAIT_S) -> Self:
        assert self.process is None or self.process.poll() is not None, "still running"
        return self.start(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        try:
            wait_ready(self.process, self.url, timeout_s)
        except NotReady as exc:
            raise AssertionError(f"the gateway: {exc}:\n{self.tail()}") from exc

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def api_key(stack: Settings, user_id: str) -> str:
    """A new live API key of `user_id`: the bearer token."""
    from imagegen.producers.api_keys import KeyRegistry

    token, _record = KeyRegistry(stack).create(user_id)
    return token
