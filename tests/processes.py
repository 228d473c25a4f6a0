"""Run `imagegen` commands as real child processes in tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_WAIT_S = 240
#: How much of a service's log a failed test's report shows.
LOG_TAIL_CHARS = 4000

#: Every service started in this session: a failed test's report shows the logs of those
#: that ran during it (`log_tails`), since CI keeps nothing but the report.
_STARTED: list[Service] = []


class Service:
    """A long-running `imagegen` command (processor, worker) with its output in a file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, launcher: Path | None = None
    ) -> None:
        """`launcher` is a script that runs the command line instead of `python -m imagegen`
        (to set the process up first)."""
        self.args = args
        self.env = env
        self.log = log
        self.launcher = launcher
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.time()
        _STARTED.append(self)
        with self.log.open("ab") as out:
            program = [str(self.launcher)] if self.launcher else ["-m", "imagegen"]
            self.process = subprocess.Popen(
                [sys.executable, *program, *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM, and wait for a graceful exit."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        # A worker finishes its in-flight render first, and a long render on a loaded
        # 2-core machine takes minutes; the test's own timeout bounds a real hang.
        return self.process.wait(STOP_WAIT_S)

    def assert_running(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()[-3000:]


def log_tails(since: float) -> list[tuple[str, str]]:
    """(title, tail) of the log of each service still running, or started at `since` or
    later (epoch seconds)."""
    ran = [
        service
        for service in _STARTED
        if service.started_at >= since or (service.process and service.process.poll() is None)
    ]
    return [
        (f"log of imagegen {' '.join(service.args)} ({service.log.name})", _tail(service.log))
        for service in ran
    ]


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.exists() else "(no log)"
