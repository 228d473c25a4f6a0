"""Run `imagegen` commands as real child processes in tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

STOP_WAIT_S = 240


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

    def start(self) -> None:
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
