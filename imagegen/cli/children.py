"""`imagegen` commands run as child processes, by the demo and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from imagegen.schemas.errors import ImagegenError

# A processor or worker finishes or releases its in-flight work on SIGTERM; a render
# batch on a slow CPU can take a while.
STOP_TIMEOUT_S = 60.0


class NotReady(ImagegenError):
    """A child HTTP server exited, or did not answer `GET /readyz` 200 in time."""


@contextmanager
def imagegen_child(
    args: list[str], env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`imagegen <args>` with its output in `log`; stopped as `module_child` says."""
    with module_child("imagegen", args, env, log) as process:
        yield process


@contextmanager
def module_child(
    module: str, args: list[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m <module> <args>` with its output in `log`.

    On the way out it gets SIGTERM, and SIGKILL if it has not stopped within
    `STOP_TIMEOUT_S`; either way it has been reaped, so its `returncode` tells how it ended.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    """Return once the server at `url` answers `GET /readyz` 200; `NotReady` says why not.

    Readiness has no event to await from outside the process, so it is polled.
    """
    deadline = time.monotonic() + timeout_s
    why = "not listening"
    with httpx.Client(base_url=url, timeout=5.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise NotReady(f"it exited with {process.returncode}")
            try:
                answer = http.get("/readyz")
                if answer.status_code == 200:
                    return
                why = answer.text
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
    raise NotReady(f"not ready within {timeout_s:g} s ({why})")
