"""A private embedded stack for one benchmark run, on free ports, stopped afterwards."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagegen.infra.embedded import EMBEDDED_FETCH_WAIT_MS, EmbeddedStack
from imagegen.infra.settings import Settings, as_environment, load_settings

# Tansu holds a consumer group's first join for half the session timeout.
SESSION_TIMEOUT_MS = 2000


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def private_stack() -> Iterator[Settings]:
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as state_dir:
        settings = load_settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            s3_endpoint=f"127.0.0.1:{free_port()}",
            state_dir=str(Path(state_dir)),
            kafka_session_timeout_ms=SESSION_TIMEOUT_MS,
            kafka_fetch_wait_ms=EMBEDDED_FETCH_WAIT_MS,
            # Benchmarks run beside other work: the default metrics ports may be taken.
            processor_metrics_port=0,
            worker_metrics_port=0,
        )
        stack = EmbeddedStack(settings)
        stack.up(progress=lambda _: None)
        try:
            yield settings
        finally:
            stack.down()


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points an `imagegen` child process at `settings`' stack, with
    `extra` settings (by name, lowercase) on top."""
    return {
        **os.environ,
        **as_environment(settings),
        **{f"IMAGEGEN_{name.upper()}": value for name, value in extra.items()},
    }
