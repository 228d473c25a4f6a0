"""`imagegen` commands run as child processes, by the demo and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

# A processor or worker finishes or releases its in-flight work on SIGTERM; a render
# batch on a slow CPU can take a while.
STOP_TIMEOUT_S = 60.0


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
