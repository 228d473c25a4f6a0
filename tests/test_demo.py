"""`imagegen demo --serve`, run as a person runs it: a child process that starts its own
embedded stack on free ports, a processor, a worker and a gateway, does the scripted run,
then prints the web page's URL and a demo key. The test uses both, stops the demo with
SIGTERM, and checks that it left nothing running.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagegen.client import Client
from imagegen.infra.settings import as_environment, load_settings
from tests.conftest import TEST_SETTINGS
from tests.helpers import free_port

START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 180
KEY_LINE = re.compile(r"^\s*API key:\s+(\S+)\s*$")
PAGE_LINE = re.compile(r"^\s*page:\s+(\S+)\s*$")


class Printed:
    """The lines a child prints, as they come, read on a thread so that a wait can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._incoming: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._incoming.put(line)
        self._incoming.put(None)  # the output ended

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> str:
        """The first group of the first line, from here on, that matches `pattern`."""
        while True:
            try:
                line = self._incoming.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"nothing matched {pattern.pattern}:\n{self.text}") from None
            if line is None:
                raise AssertionError(f"the output ended before {pattern.pattern}:\n{self.text}")
            self.lines.append(line)
            if found := pattern.match(line):
                return found.group(1)

    def rest(self) -> str:
        """Everything, once the output has ended."""
        while (line := self._incoming.get(timeout=STOP_TIMEOUT_S)) is not None:
            self.lines.append(line)
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.lines)


ServedDemo = tuple[subprocess.Popen[str], Printed]


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    """A stack of its own that no one has started: the demo starts it, on free ports."""
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        s3_endpoint=f"127.0.0.1:{free_port()}",
        state_dir=str(tmp_path / "state"),
        # A smaller bucket: the demo's burst beyond it is then a few renders, not thirteen.
        rate_user_burst=3,
        **TEST_SETTINGS,
    )
    # As a person's shell has it: buffered output must still show the key when it is printed.
    outside = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IMAGEGEN_") and k != "PYTHONUNBUFFERED"
    }
    return {**outside, **as_environment(settings)}


@pytest.fixture
def served_demo(demo_env: dict[str, str], tmp_path: Path) -> Iterator[ServedDemo]:
    command = [sys.executable, "-m", "imagegen", "demo", "--serve", "-n", "1"]
    command += ["--port", str(free_port()), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(
        command,
        env=demo_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process, Printed(process)
    finally:
        if process.poll() is None:  # the test failed: stop it as a person would, children too
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_demo_serve_prints_the_page_and_a_key_that_work_then_stops_everything(
    served_demo: ServedDemo, demo_env: dict[str, str]
) -> None:
    process, printed = served_demo
    page = printed.wait_for(PAGE_LINE, START_TIMEOUT_S)
    key = printed.wait_for(KEY_LINE, 30)

    shown = httpx.get(page, timeout=10)
    assert shown.status_code == 200
    assert shown.headers["content-type"].startswith("text/html")
    with Client(page, api_key=key, timeout_s=30) as client:
        submitted = client.generate("a kite over the sea", width=64, height=64, steps=2)
        assert client.wait(submitted.id, timeout_s=300).status == "succeeded"
        assert client.download(submitted.id).startswith(b"\x89PNG")
        assert [job.id for job in client.jobs().data] == [submitted.id]

    process.send_signal(signal.SIGTERM)
    assert process.wait(STOP_TIMEOUT_S) == 0, printed.rest()
    output = printed.rest()
    assert "revoked the demo key" in output
    assert "stopped the embedded stack" in output
    broker = demo_env["IMAGEGEN_KAFKA_BOOTSTRAP"].rsplit(":", 1)
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((broker[0], int(broker[1])), timeout=5),
    ):
        pass


def test_demo_serve_on_a_taken_port_says_so_before_it_starts_anything(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = subprocess.run(
            [sys.executable, "-m", "imagegen", "demo", "--serve", "--port", str(port)],
            env=demo_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert refused.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in refused.stderr
    assert "--port" in refused.stderr
    assert "starting the embedded stack" not in refused.stdout
